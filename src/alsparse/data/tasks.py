"""Zero-shot multiple-choice tasks from the local task files, in lm-eval's prompt formats.

Files (data/tasks, formats in ASSETS.md) are llm-foundry JSONL (`query`/`choices`/`gold`), the
original HellaSwag JSONL and GLUE's RTE TSV. Each loader rebuilds lm-eval's `doc_to_text` /
`doc_to_choice` (the target delimiter " " is added when scoring):

| task | context | choices |
|---|---|---|
| piqa | "Question: {goal}\\nAnswer:" | sol1, sol2 |
| arc_easy, arc_challenge | "Question: {question}\\nAnswer:" | choice texts |
| boolq | "{passage}\\nQuestion: {question}?\\nAnswer:" | "no", "yes" |
| openbookqa | "{question_stem}" | choice texts |
| copa | "{premise without final period} because/therefore" | choice, first letter lower-cased |
| rte | "{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:" | "True", "False" (label 0) |
| hellaswag | preprocess("{activity_label}: {ctx_a} {ctx_b.capitalize()}") | preprocess(ending) |
| winogrande | one context per option: sentence up to the blank + option | the shared rest of the sentence |

A malformed row is a ValueError naming the file and the line number; no row is ever skipped.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..registry import Registry
from .paths import data_file


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question as lm-eval scores it: choice i is the pair
    (contexts[i or 0], target_delimiter + continuations[i or 0]).

    contexts: one prompt shared by every choice, or one per choice (partial scoring, WinoGrande).
    continuations: the choice texts, or one text shared by all contexts (partial scoring).
    acc_norm divides by the characters of lm-eval's ``doc_to_choice`` string (``completion_len``):
    the continuation without the delimiter when the context is shared, and the *context* of the
    choice when each choice has its own (WinoGrande's ``sentence[:blank] + option``).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    target_delimiter: str = " "

    def __post_init__(self) -> None:
        object.__setattr__(self, "contexts", tuple(self.contexts))
        object.__setattr__(self, "continuations", tuple(self.continuations))
        n_ctx, n_cont = len(self.contexts), len(self.continuations)
        if min(n_ctx, n_cont) != 1 or max(n_ctx, n_cont) < 2:
            raise ValueError(
                f"an item needs one context and >= 2 continuations, or >= 2 contexts and one "
                f"continuation; got {n_ctx} contexts and {n_cont} continuations"
            )
        if not all(isinstance(text, str) for text in self.contexts + self.continuations):
            raise ValueError("contexts and continuations must be strings")
        if not all(self.continuations):
            raise ValueError("continuations must be non-empty")
        if not isinstance(self.gold, int) or not 0 <= self.gold < self.n_choices:
            raise ValueError(f"gold must be an index in [0, {self.n_choices}), got {self.gold!r}")

    @classmethod
    def single(cls, context: str, continuations, gold: int) -> "MultipleChoiceItem":
        return cls((context,), tuple(continuations), gold)

    @classmethod
    def partial(cls, contexts, continuation: str, gold: int) -> "MultipleChoiceItem":
        return cls(tuple(contexts), (continuation,), gold)

    @property
    def n_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def pairs(self) -> list[tuple[str, str]]:
        """(context, scored continuation) per choice."""
        return [
            (self.contexts[min(i, len(self.contexts) - 1)],
             self.target_delimiter + self.continuations[min(i, len(self.continuations) - 1)])
            for i in range(self.n_choices)
        ]

    def norm_lengths(self) -> list[int]:
        """acc_norm divisor per choice: characters of the text that tells the choices apart (the
        per-choice contexts under partial scoring, else the continuations), as lm-eval divides."""
        texts = self.contexts if len(self.contexts) > 1 else self.continuations
        return [len(text) for text in texts]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _choices_gold(row: dict) -> tuple[list[str], int]:
    choices, gold = row["choices"], row["gold"]
    _require(isinstance(choices, list) and all(isinstance(c, str) and c for c in choices),
             "'choices' must be a list of non-empty strings")
    _require(isinstance(gold, int) and 0 <= gold < len(choices), f"'gold' {gold!r} is not a choice index")
    return choices, gold


def _query(row: dict, prefix: str = "", suffix: str = "") -> str:
    query = row["query"]
    _require(isinstance(query, str), "'query' must be a string")
    _require(query.startswith(prefix), f"'query' does not start with {prefix!r}")
    _require(query.endswith(suffix), f"'query' does not end with {suffix!r}")
    return query


def _piqa(row: dict) -> MultipleChoiceItem:
    # llm-foundry: "Question: {goal}\n"
    return MultipleChoiceItem.single(_query(row, "Question: ", "\n") + "Answer:", *_choices_gold(row))


def _arc(row: dict) -> MultipleChoiceItem:
    # llm-foundry: "Question: {question}"
    return MultipleChoiceItem.single(_query(row, "Question: ") + "\nAnswer:", *_choices_gold(row))


def _boolq(row: dict) -> MultipleChoiceItem:
    # llm-foundry: "Passage: {passage}\nQuestion: {question}?"
    query = _query(row, "Passage: ", "?")
    _require("\nQuestion: " in query, "'query' has no '\\nQuestion: '")
    choices, gold = _choices_gold(row)
    _require(choices == ["no", "yes"], f"boolq choices must be ['no', 'yes'], got {choices!r}")
    return MultipleChoiceItem.single(query[len("Passage: "):] + "\nAnswer:", choices, gold)


def _openbookqa(row: dict) -> MultipleChoiceItem:
    return MultipleChoiceItem.single(_query(row), *_choices_gold(row))


_COPA_QUERY = re.compile(r"^(?P<premise>.+), (?P<connector>because|therefore)$", re.DOTALL)


def _copa(row: dict) -> MultipleChoiceItem:
    # llm-foundry: "{premise without period}, {connector}"; lm-eval: "{premise[:-1]} {connector}".
    match = _COPA_QUERY.match(_query(row))
    _require(match is not None, "'query' does not end with ', because' or ', therefore'")
    choices, gold = _choices_gold(row)
    lowered = [choice[0].lower() + choice[1:] for choice in choices]  # lm-eval convert_choice
    return MultipleChoiceItem.single(f"{match['premise']} {match['connector']}", lowered, gold)


def _winogrande(row: dict) -> MultipleChoiceItem:
    options, continuation, gold = row["context_options"], row["continuation"], row["gold"]
    _require(isinstance(options, list) and len(options) == 2 and all(isinstance(o, str) for o in options),
             "'context_options' must be a list of two strings")
    _require(isinstance(continuation, str) and continuation.strip() != "", "'continuation' must be a non-empty string")
    _require(isinstance(gold, int) and gold in (0, 1), f"'gold' {gold!r} is not 0 or 1")
    return MultipleChoiceItem.partial(options, continuation.strip(), gold)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip WikiHow bracket artefacts and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(row: dict) -> MultipleChoiceItem:
    fields = [row["activity_label"], row["ctx_a"], row["ctx_b"]]
    _require(all(isinstance(f, str) for f in fields), "'activity_label', 'ctx_a', 'ctx_b' must be strings")
    endings = row["endings"]
    _require(isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings),
             "'endings' must be a list of strings")
    gold = int(row["label"])
    _require(0 <= gold < len(endings), f"'label' {row['label']!r} is not an ending index")
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    return MultipleChoiceItem.single(query, [hellaswag_preprocess(e) for e in endings], gold)


def _rte(row: dict) -> MultipleChoiceItem:
    _require(row["label"] in ("0", "1"), f"'label' {row['label']!r} is not 0 or 1")
    context = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
    return MultipleChoiceItem.single(context, ["True", "False"], int(row["label"]))  # 0 = entailment = True


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as file:
        for lineno, line in enumerate(file, start=1):
            if not line.strip():
                raise ValueError(f"{path}:{lineno}: empty line")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, row


RTE_COLUMNS = ["sentence1", "sentence2", "label", "idx"]


def _tsv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != RTE_COLUMNS:
            raise ValueError(f"{path}:1: expected the header {RTE_COLUMNS}, got {header}")
        for lineno, fields in enumerate(reader, start=2):
            if len(fields) != len(RTE_COLUMNS):
                raise ValueError(
                    f"{path}:{lineno}: expected {len(RTE_COLUMNS)} tab-separated fields, got {len(fields)}"
                )
            yield lineno, dict(zip(RTE_COLUMNS, fields))


@dataclass(frozen=True)
class TaskSpec:
    name: str
    relpath: str
    convert: Callable[[dict], MultipleChoiceItem]
    metric: str  # metric of record (ALS paper): "acc" or "acc_norm"
    rows: Callable[[Path], Iterator[tuple[int, dict]]] = _jsonl_rows


TASKS: Registry[TaskSpec] = Registry("task")
for _spec in (
    TaskSpec("piqa", "tasks/piqa.jsonl", _piqa, "acc_norm"),
    TaskSpec("arc_easy", "tasks/arc_easy.jsonl", _arc, "acc_norm"),
    TaskSpec("arc_challenge", "tasks/arc_challenge.jsonl", _arc, "acc_norm"),
    TaskSpec("boolq", "tasks/boolq.jsonl", _boolq, "acc"),
    TaskSpec("winogrande", "tasks/winogrande.jsonl", _winogrande, "acc"),
    TaskSpec("openbookqa", "tasks/openbookqa.jsonl", _openbookqa, "acc_norm"),
    TaskSpec("copa", "tasks/copa.jsonl", _copa, "acc"),
    TaskSpec("rte", "tasks/rte_dev.tsv", _rte, "acc", _tsv_rows),
    TaskSpec("hellaswag", "tasks/hellaswag_val_subset1000.jsonl", _hellaswag, "acc_norm"),
):
    TASKS.register(_spec.name)(_spec)


def task_names() -> list[str]:
    return TASKS.names()


def metric_of_record(task: str) -> str:
    return TASKS.get(task).metric


def parse_task_file(task: str, path: str | Path) -> list[MultipleChoiceItem]:
    """Every row of `path` in `task`'s format; a malformed row raises ValueError with file:line."""
    spec, path = TASKS.get(task), Path(path)
    items = []
    for lineno, row in spec.rows(path):
        try:
            items.append(spec.convert(row))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"{path}:{lineno}: malformed {task} row: {detail}") from None
    return items


def load_task(task: str, limit: int | None = None) -> list[MultipleChoiceItem]:
    """The items of a registered task from the data directory (the first `limit` if given)."""
    items = parse_task_file(task, data_file(TASKS.get(task).relpath))
    return items if limit is None else items[:limit]
