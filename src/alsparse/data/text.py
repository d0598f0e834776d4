"""Evaluation and calibration corpora: WikiText-2, PTB, any local text file.

Offline the corpora are read from the data directory (see `paths.py`); online users without the
local files get the same text through `datasets` (needs the `data` extra).

Corpus strings reproduce what the pruning papers' scripts build from the Hugging Face datasets
(`"\\n\\n".join(rows)`):

* wikitext2 -- rows as the HF `wikitext` builder yields them: a non-blank line keeps its "\\n",
  a blank line is "". Locally this is WikiText-2 **v1** (with `<unk>`); online `wikitext-2-raw-v1`.
  Detokenised with lm-eval's `wikitext_detokenizer` by default (the whole joined string).
* ptb -- `ptb_text_only` rows are stripped lines; only the validation split exists locally (the
  split GPTQ / SparseGPT / Wanda call "ptb"). Not detokenised.
* a path to a `.txt` file -- read verbatim.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..registry import Registry
from .paths import data_file

log = logging.getLogger(__name__)


def wikitext_detokenize(string: str) -> str:
    """lm-eval's `wikitext_detokenizer` (lm_eval/tasks/wikitext/preprocess_wikitext.py), rule for rule."""
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string



@dataclass(frozen=True)
class CorpusSpec:
    """How to build one corpus; `local` maps split -> file under the data directory."""

    name: str
    local: dict[str, str]
    eval_split: str  # the split the token-ppl protocol reports
    hf_path: str
    hf_name: str | None
    hf_field: str
    row: Callable[[str], str]  # one line of the local file -> one HF row
    detokenize: bool


CORPORA: Registry[CorpusSpec] = Registry("corpus")
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


def _wikitext_row(line: str) -> str:
    return line + "\n" if line.strip() else ""


CORPORA.register("wikitext2")(
    CorpusSpec("wikitext2", {"test": "wikitext2/test.txt", "validation": "wikitext2/valid.txt"},
               "test", "wikitext", "wikitext-2-raw-v1", "text", _wikitext_row, True))
CORPORA.register("ptb")(
    CorpusSpec("ptb", {"validation": "ptb/valid.txt"}, "validation",
               "ptb_text_only", "penn_treebank", "sentence", str.strip, False))


def is_text_path(name_or_path: str) -> bool:
    return name_or_path not in CORPORA and (name_or_path.endswith(".txt") or Path(name_or_path).is_file())


def _read_lines(path: Path) -> list[str]:
    """Lines as `for line in open(path)` yields them, without their "\n"."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _hf_rows(spec: CorpusSpec, split: str) -> list[str]:
    import datasets  # optional extra: only online users reach this

    log.info("loading %s/%s split %s through `datasets`", spec.hf_path, spec.hf_name, split)
    return list(datasets.load_dataset(spec.hf_path, spec.hf_name, split=split)[spec.hf_field])


def _datasets_available() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _rows(spec: CorpusSpec, split: str) -> list[str]:
    """Local file rows; through `datasets` only when the local file is missing and it is installed."""
    relpath = spec.local.get(split)
    if relpath is None and not _datasets_available():
        raise ValueError(
            f"corpus {spec.name!r}: split {split!r} is not available locally (local splits: "
            f"{', '.join(spec.local)}); install `datasets` and go online for other splits"
        )
    if relpath is not None:
        try:
            return [spec.row(line) for line in _read_lines(data_file(relpath))]
        except FileNotFoundError as missing:
            if not _datasets_available():
                raise
            local_error = missing
    else:
        local_error = None
    try:
        return _hf_rows(spec, split)
    except Exception as online_error:
        if local_error is None:
            raise
        raise FileNotFoundError(f"{local_error}\n`datasets` failed too: {online_error}") from online_error


def load_corpus(name_or_path: str, split: str | None = None, detokenize: bool | None = None) -> str:
    """The evaluation string of a registered corpus (rows joined with "\\n\\n") or a local .txt file.

    split: defaults to the corpus' evaluation split (wikitext2 "test", ptb "validation");
    "valid"/"dev" mean "validation". detokenize: defaults to the corpus' convention.
    """
    if is_text_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        return wikitext_detokenize(text) if detokenize else text
    spec = CORPORA.get(name_or_path)
    split = SPLIT_ALIASES.get(split, split) if split else spec.eval_split
    text = "\n\n".join(_rows(spec, split))
    if spec.detokenize if detokenize is None else detokenize:
        text = wikitext_detokenize(text)
    return text


def split_wikitext_documents(lines: list[str]) -> list[str]:
    """Pages as lm-eval's `EleutherAI/wikitext_document_level` builds them: a new document starts
    at every top-level heading line (" = Title = ", not " = = Section = = "); pages keep their
    lines joined with "\\n"; empty pages are skipped except the last one."""
    pages: list[str] = []
    current: list[str] = []
    for line in lines:
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


def documents(name: str = "wikitext2", split: str = "test") -> list[str]:
    """Original (not detokenised) WikiText-2 pages for lm-eval's `wikitext` word-ppl task.

    lm-eval scores `wikitext_detokenize(page)` and counts words and bytes on `page` itself.
    Locally the pages come from the v1 file split by `split_wikitext_documents` (the builder reads
    the file with `f.read().split("\\n")`); online from `EleutherAI/wikitext_document_level`.
    """
    if name != "wikitext2":
        raise ValueError(f"documents exist for 'wikitext2' only (lm-eval's wikitext task), not {name!r}")
    split = SPLIT_ALIASES.get(split, split)
    spec = CORPORA.get(name)
    relpath = spec.local.get(split)
    try:
        if relpath is None:
            raise FileNotFoundError(f"no local file for wikitext2 split {split!r}")
        return split_wikitext_documents(data_file(relpath).read_text(encoding="utf-8").split("\n"))
    except FileNotFoundError:
        if not _datasets_available():
            raise
    import datasets

    dataset = datasets.load_dataset("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", split=split)
    return list(dataset["page"])
