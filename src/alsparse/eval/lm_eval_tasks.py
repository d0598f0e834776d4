"""lm-eval's own task definitions over the local data files, for offline runs of the harness.

lm-eval reads a task from a YAML, and a YAML may ``include`` another: each task written here
includes the *installed* lm-eval's official YAML (its doc_to_text, doc_to_choice, doc_to_target,
target delimiter, process_docs and metrics, unchanged) and overrides only where the documents come
from: a JSON-lines file in the official dataset's schema, converted from the local file
(../shared/data/tasks, llm-foundry's format; ASSETS.md). The conversions invert llm-foundry's, so
the official templates rebuild the prompts exactly (tests/integration/test_lm_eval_equality.py
checks them item by item against alsparse's own evaluator).

    directory = write_tasks(tmp, ["piqa", "wikitext"])   # -> {"piqa": "alsparse_piqa", ...}
    lm_eval.simple_evaluate(..., tasks=[...], task_manager=TaskManager(include_path=str(tmp)))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..data.paths import data_file
from ..data.tasks import TASKS

PREFIX = "alsparse_"  # local task names: alsparse_piqa, ... (never the official names, which need the hub)


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _piqa(row: dict) -> dict:
    query = row["query"]  # "Question: {goal}\n"
    return {"goal": query[len("Question: "):-1], "sol1": row["choices"][0], "sol2": row["choices"][1],
            "label": row["gold"]}


def _arc(row: dict) -> dict:
    labels = _letters(len(row["choices"]))  # "Question: {question}"
    return {"question": row["query"][len("Question: "):], "choices": {"text": row["choices"], "label": labels},
            "answerKey": labels[row["gold"]]}


def _boolq(row: dict) -> dict:
    passage, question = row["query"][len("Passage: "):].rsplit("\nQuestion: ", 1)  # "...{question}?"
    return {"passage": passage, "question": question[:-1], "label": row["gold"]}


def _openbookqa(row: dict) -> dict:
    labels = _letters(len(row["choices"]))
    return {"question_stem": row["query"], "choices": {"text": row["choices"], "label": labels},
            "answerKey": labels[row["gold"]]}


def _winogrande(row: dict) -> dict:
    """llm-foundry keeps ``sentence[:blank] + option`` per option and the rest of the sentence;
    any split of the two contexts into a shared prefix and the options gives them back, so the
    longest common prefix stands for the text before the blank."""
    first, second = row["context_options"]
    prefix = os.path.commonprefix([first, second])
    return {"sentence": f"{prefix}_ {row['continuation'].strip()}", "option1": first[len(prefix):],
            "option2": second[len(prefix):], "answer": str(row["gold"] + 1)}


def _rte(row: dict) -> dict:
    return {"sentence1": row["sentence1"], "sentence2": row["sentence2"], "label": int(row["label"]),
            "idx": int(row["idx"])}


def _same(row: dict) -> dict:
    return row


@dataclass(frozen=True)
class LocalTask:
    official_yaml: str  # relative to lm_eval/tasks
    convert: Callable[[dict], dict]
    split: str = "validation"  # the split the local documents are served as


LOCAL_TASKS = {
    "piqa": LocalTask("piqa/piqa.yaml", _piqa),
    "arc_easy": LocalTask("arc/arc_easy.yaml", _arc),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", _arc),
    "boolq": LocalTask("super_glue/boolq/default.yaml", _boolq),
    "openbookqa": LocalTask("openbookqa/openbookqa.yaml", _openbookqa),
    "winogrande": LocalTask("winogrande/default.yaml", _winogrande),
    "rte": LocalTask("glue/rte/default.yaml", _rte),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", _same),
    "wikitext": LocalTask("wikitext/wikitext.yaml", _same, split="test"),
}


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _documents(task: str) -> Iterable[dict]:
    if task == "wikitext":  # the documents alsparse's word-ppl reads (WikiText-2 test, raw, per page)
        from ..data.text import documents

        return ({"page": page} for page in documents("wikitext2", "test"))
    spec = TASKS.get(task)
    return (LOCAL_TASKS[task].convert(row) for _, row in spec.rows(data_file(spec.relpath)))


def write_tasks(directory: str | os.PathLike, tasks: Sequence[str]) -> dict[str, str]:
    """Write each task's documents (official schema, JSON lines) and its YAML into ``directory``;
    returns task -> the local task name to ask lm-eval for."""
    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown:
        raise ValueError(f"no local lm-eval definition for {', '.join(unknown)}; "
                         f"available: {', '.join(LOCAL_TASKS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    official = lm_eval_tasks_dir()
    names = {}
    for task in tasks:
        local = LOCAL_TASKS[task]
        include = official / local.official_yaml
        if not include.is_file():
            raise FileNotFoundError(f"the installed lm-eval has no {local.official_yaml} (needed for {task})")
        docs = directory / f"{task}.jsonl"
        with docs.open("w", encoding="utf-8") as out:
            for doc in _documents(task):
                out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
        splits[f"{local.split}_split"] = local.split
        config = {"include": str(include), "task": PREFIX + task, "tag": ["alsparse_local"], "dataset_path": "json",
                  "dataset_name": None, "dataset_kwargs": {"data_files": {local.split: str(docs)}}, **splits}
        (directory / f"{task}.yaml").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")  # JSON is YAML
        names[task] = PREFIX + task
    return names
