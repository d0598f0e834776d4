"""Sweep results: read results files (JSON lines written by `alsparse.sweep`) and turn them into
Markdown tables and PNG figures. Two evaluation protocols are never in one table or one figure: a
table is one (model, protocol, calibration) where a protocol is e.g. token-ppl on WikiText-2 test at
seq_len 1024 over the first 40 windows (../shared/PROTOCOLS.md)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

log = logging.getLogger(__name__)

STAGES = ("load", "calibration", "atp_search", "strength_search", "search", "capture", "pass1", "allocation", "prune",
          "heldout", "eval")
NOT_PRUNING = ("load", "calibration", "eval", "checkpoint")  # stages of a cell that are not the prune's own work


class ResultsFileError(ValueError):
    """A results file that cannot be read (a malformed line that is not the last one)."""


# --- reading --------------------------------------------------------------------------------


def read_records(path: str | os.PathLike[str], with_offset: bool = False):
    """The records of one results file. A malformed *last* line (a write cut short by a kill) is
    ignored with a warning; a malformed line before it is an error naming the line.

    with_offset: also return the byte length of the valid prefix (where a partial line starts)."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    records: list[dict] = []
    pos = valid = number = 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        end = newline + 1 if newline != -1 else len(data)
        raw, number = data[pos:end], number + 1
        if raw.strip():
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError("not a cell record")
            except ValueError as exc:
                if data[end:].strip():
                    raise ResultsFileError(f"{path}: line {number} is not a valid result record ({exc}); "
                                           f"fix or delete that line") from None
                log.warning("%s: line %d is incomplete (an interrupted write); ignored", path, number)
                break
            if newline == -1:  # complete JSON but no newline: an interrupted write; the next append would join it
                log.warning("%s: line %d has no newline (an interrupted write); ignored", path, number)
                break
            records.append(record)
        pos = valid = end
    return (records, valid) if with_offset else records


def load_results(paths: Sequence[str | os.PathLike[str]]) -> list[dict]:
    """Records of one or more results files, each cell id once (the first occurrence kept)."""
    seen: dict[str, dict] = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"results file {path} does not exist")
        for record in read_records(path):
            if record["id"] in seen:
                log.warning("%s: cell %s appears more than once; the first is kept", path, record["id"])
                continue
            seen[record["id"]] = record
    return list(seen.values())


# --- what a table is made of ------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """One perplexity protocol: numbers under two different Protocols are never compared."""

    kind: str  # "token-ppl" | "word-ppl"
    corpus: str
    split: str
    length: int  # seq_len (token-ppl) or max_length (word-ppl)
    count: int  # windows (token-ppl) or documents (word-ppl)
    bos: bool | None = None

    @property
    def title(self) -> str:
        is_file = self.split == "file" or "/" in self.corpus or self.corpus.endswith(".txt")
        corpus = f"text file {Path(self.corpus).name}" if is_file else f"{self.corpus} {self.split}"
        if self.kind == "token-ppl":
            bos = ", BOS prepended" if self.bos else ""
            return (f"token-ppl, {corpus}, seq_len {self.length}, first {self.count} "
                    f"non-overlapping windows{bos}")
        return f"word-ppl (lm-eval rolling), {corpus}, max_length {self.length}, {self.count} documents"


def ppl_values(record: dict) -> list[tuple[Protocol, float]]:
    ev = record.get("eval") or {}
    out = []
    for r in (ev.get("token_ppl") or {}).values():
        out.append((Protocol("token-ppl", r["corpus"], r["split"], r["seq_len"], r["windows"], bool(r.get("bos"))),
                    r["ppl"]))
    for r in (ev.get("word_ppl") or {}).values():
        out.append((Protocol("word-ppl", r["corpus"], r["split"], r["max_length"], r["documents"]),
                    r["word_perplexity"]))
    return out


def task_protocol(record: dict) -> tuple:
    """(task, items, metric of record) for every task: zero-shot numbers compare only under the same one."""
    tasks = (record.get("eval") or {}).get("tasks") or {}
    return tuple(sorted((t, r["n"], r["metric_of_record"]) for t, r in tasks.items()))


def calibration_key(record: dict) -> tuple:
    c = record["config"].get("calibration") or {}
    return (c.get("corpus"), c.get("nsamples"), c.get("seqlen"))


def calibration_title(record: dict) -> str:
    corpus, nsamples, seqlen = calibration_key(record)
    source = (record.get("calibration") or {}).get("source") or corpus
    source = Path(str(source)).name if str(source).endswith(".txt") else source
    return f"calibration {source}, {nsamples} x {seqlen} tokens"


def row_key(record: dict) -> tuple:
    c = record["config"]
    return (c["method"], c["pattern"], float(c["sparsity"]))


def row_label(key: tuple) -> str:
    method, pattern, sparsity = key
    return f"{method} {pattern}" if pattern != "unstructured" else f"{method} {_percent(sparsity)}"


def _percent(x: float) -> str:
    return f"{100 * x:.4g}%"


def _row_sort(keys: Iterable[tuple]) -> list[tuple]:
    keys = list(dict.fromkeys(keys))
    methods = list(dict.fromkeys(k[0] for k in keys))

    def order(key):
        method, pattern, sparsity = key
        nm = re.fullmatch(r"(\d+):(\d+)", pattern)
        return (methods.index(method), 1 if nm else 0, (int(nm.group(2)), int(nm.group(1))) if nm else (0, 0), sparsity)

    return sorted(keys, key=order)


def _columns(labels: Iterable[str]) -> list[str]:
    labels = list(dict.fromkeys(labels))
    return (["uniform"] if "uniform" in labels else []) + [x for x in labels if x != "uniform"]


@dataclass
class Stat:
    """One table cell: a value per calibration seed."""

    by_seed: dict[int, float] = field(default_factory=dict)

    def add(self, seed: int, value: float) -> None:
        self.by_seed.setdefault(seed, value)

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return sum(self.by_seed.values()) / self.n

    @property
    def lo(self) -> float:
        return min(self.by_seed.values())

    @property
    def hi(self) -> float:
        return max(self.by_seed.values())

    @property
    def half_range(self) -> float:
        return (self.hi - self.lo) / 2

    def mean_over(self, seeds: set[int] | frozenset[int]) -> float:
        """Mean over the given seeds (those this cell has); over all its seeds when none of them is given."""
        values = [v for s, v in self.by_seed.items() if s in seeds] or list(self.by_seed.values())
        return sum(values) / len(values)


def _fmt(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}" if abs(x) < 1e6 else f"{x:.3e}"


def _stat_text(stat: Stat, bold: bool, delta: float | None, scale: float = 1.0, digits: int = 2) -> str:
    text = _fmt(stat.mean * scale, digits)
    text = f"**{text}**" if bold else text
    if stat.n > 1:
        text += f" ± {_fmt(stat.half_range * scale, digits)}"
    if delta is not None:
        text += f" ({delta * scale:+.{digits}f})"
    return text


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _pivot(records: Sequence[dict], value: Callable[[dict], float | None], row: Callable[[dict], Any],
           col: Callable[[dict], str]) -> tuple[list, list[str], dict]:
    cells: dict[tuple, Stat] = {}
    for r in records:
        v = value(r)
        if v is None:
            continue
        cells.setdefault((row(r), col(r)), Stat()).add(r["config"].get("seed", 0), v)
    rows = list(dict.fromkeys(k[0] for k in cells))  # each row once, though several columns fill it
    cols = _columns(k[1] for k in cells)
    return rows, cols, cells


def _pivot_lines(rows: list, cols: list[str], cells: dict, row_text: Callable[[Any], str], lower_is_better: bool,
                 scale: float = 1.0, digits: int = 2) -> list[str]:
    """Markdown rows: each cell prints its mean over the seeds it has. Like is compared with like: the best
    of a row (bold, with every value that ties with it as printed) is judged on the calibration seeds every
    cell of the row has, and the delta to the uniform column in parentheses is taken over the seeds the
    cell shares with uniform. So one seed-0 cell is compared with uniform's seed 0, not with uniform's mean
    over two seeds (a seed-to-seed swing is not an allocator's gain)."""
    def shown(v: float) -> float:  # compare what the table prints: 43.625 and 43.62499999 are one value
        return round(v * scale, digits)

    out = []
    for r in rows:
        stats = {c: cells[(r, c)] for c in cols if (r, c) in cells}
        common = frozenset.intersection(*(frozenset(st.by_seed) for st in stats.values())) if stats else frozenset()
        judged = {c: shown(st.mean_over(common)) for c, st in stats.items()}
        finite = [v for v in judged.values() if not math.isnan(v)]
        best = (min(finite) if lower_is_better else max(finite)) if finite else None
        uniform = stats.get("uniform")
        line = [row_text(r)]
        for c in cols:
            stat = stats.get(c)
            if stat is None:
                line.append("")
                continue
            delta = None
            if uniform is not None and c != "uniform":
                shared = frozenset(stat.by_seed) & frozenset(uniform.by_seed)
                delta = stat.mean_over(shared) - uniform.mean_over(shared) if shared else None
            bold = best is not None and len(set(finite)) > 1 and judged[c] == best
            line.append(_stat_text(stat, bold, delta, scale, digits))
        out.append(line)
    return out


def _seeds_note(records: Sequence[dict]) -> str:
    seeds = sorted({r["config"].get("seed", 0) for r in records})
    if len(seeds) <= 1:
        return f"calibration seed {seeds[0] if seeds else 0}"
    return (f"calibration seeds {', '.join(map(str, seeds))}: mean ± half the min-max range over the seeds "
            f"a cell has (no ± = one seed)")


# --- the report -------------------------------------------------------------------------------


@dataclass
class Report:
    markdown: str
    figures: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib Figure (until written)
    copies: dict[str, Path] = field(default_factory=dict)  # file name -> a sweep cell's PNG to copy
    redrawn: dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # file name -> draws it into a file
    figures_dir: str = ""  # the figures' folder relative to RESULTS.md, as the links write it ("" = beside it)

    def link(self, name: str) -> str:
        """The Markdown link target of the figure file ``name``."""
        return quote(f"{self.figures_dir}/{name}" if self.figures_dir else name)


def build_report(records: Sequence[dict], sources: Sequence[str] = (), figures: bool = True,
                 figures_dir: str = "", cells: Sequence[str] = (), preamble: str = "",
                 command: str = "") -> Report:
    """The Markdown (and the figures it links to) for a set of records. figures_dir: the figures'
    folder relative to RESULTS.md; cells: ids (or unique prefixes) whose sweep figures are shown;
    preamble: Markdown placed after the title (kept when the report is regenerated); command: the
    command line that wrote the report, quoted so the reader can regenerate it."""
    dense = [r for r in records if r.get("kind") == "dense"]
    pruned = [r for r in records if r.get("kind") == "pruned"]
    main = [r for r in pruned if not r.get("name")]
    report = Report("", figures_dir=figures_dir)
    chosen = _cells_section(records, cells, report)  # first: a bad id or a missing file fails before any figure
    intro = []
    if sources:
        intro.append(f"From {', '.join(f'`{s}`' for s in sources)}: {len(dense)} dense and {len(pruned)} pruned cells.")
    versions = sorted({str((r.get("versions") or {}).get("alsparse")) for r in records
                       if (r.get("versions") or {}).get("alsparse")})
    if versions:
        intro.append(f"alsparse {', '.join(versions)}.")
    intro.append("Every table is one model, one evaluation protocol and one calibration set-up; bold = best in its "
                 "row; (+x.xx) after a number = its difference to the uniform allocation in the same row. Where "
                 "cells of a row have different calibration seeds, like is compared with like: the best of a row "
                 "is judged on the seeds all its cells have, and a delta is taken over the seeds the cell shares "
                 "with uniform (a cell with seed 0 only is compared with uniform's seed 0, not with its mean).")
    if command:
        intro.append(f"Regenerate this file with `{command}`.")
    lines = ["# Sweep results", ""] + ([preamble.strip(), ""] if preamble.strip() else []) + [" ".join(intro), ""]
    lines += _ppl_section(main, dense, report if figures else None)
    lines += _zero_shot_section(main, dense, report if figures else None)
    lines += _ablation_section([r for r in pruned if r.get("name")], dense, main)
    lines += _cost_section(pruned, dense)
    lines += chosen
    report.markdown = "\n".join(lines).rstrip() + "\n"
    return report


def model_key(record: dict) -> str:
    """What a table is of: the model, and the compute dtype when it is not float32, so that rows
    computed in different dtypes are never one table (nor one cost comparison)."""
    compute = record["config"].get("compute_dtype", "float32")
    return record["config"]["model"] + ("" if compute == "float32" else f" ({compute} compute)")


def _groups(records: Sequence[dict], key: Callable[[dict], Any]) -> dict[Any, list[dict]]:
    out: dict[Any, list[dict]] = {}
    for r in records:
        out.setdefault(key(r), []).append(r)
    return out


def _ppl_groups(records: Sequence[dict]) -> dict[tuple, list[tuple[dict, float]]]:
    """(model, protocol, calibration) -> [(record, ppl)]."""
    out: dict[tuple, list] = {}
    for r in records:
        for protocol, value in ppl_values(r):
            out.setdefault((model_key(r), protocol, calibration_key(r)), []).append((r, value))
    return out


def _dense_ppl(dense: Sequence[dict], model: str, protocol: Protocol) -> float | None:
    for r in dense:
        for p, v in ppl_values(r):
            if model_key(r) == model and p == protocol:
                return v
    return None


def _ppl_section(records: Sequence[dict], dense: Sequence[dict], report: Report | None) -> list[str]:
    groups = _ppl_groups(records)
    if not groups:
        return []
    lines = ["## Perplexity", ""]
    for index, ((model, protocol, _), pairs) in enumerate(groups.items(), start=1):
        recs = [r for r, _ in pairs]
        values = {id(r): v for r, v in pairs}
        rows, cols, cells = _pivot(recs, lambda r, values=values: values[id(r)], row_key, lambda r: r["label"])
        rows = _row_sort(rows)
        reference = _dense_ppl(dense, model, protocol)
        lines += [f"### {protocol.title}", "",
                  (f"Model `{model}`; {calibration_title(recs[0])}; {_seeds_note(recs)}. "
                   f"Dense: {_fmt(reference) if reference is not None else 'not in the results'}. Lower is better."),
                  ""]
        lines += _md_table(["method / sparsity", *cols], _pivot_lines(rows, cols, cells, row_label, True))
        lines.append("")
        if report is not None:
            for method in dict.fromkeys(k[0] for k in rows):
                name = f"ppl_vs_sparsity_{_slug(method)}_{index}.png"
                fig = _ppl_figure(method, rows, cols, cells, protocol, model, recs[0], reference)
                if fig is not None:
                    report.figures[name] = fig
                    lines += [f"![{method}: {protocol.title}]({report.link(name)})", ""]
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ppl_figure(method, rows, cols, cells, protocol: Protocol, model: str, example: dict, dense: float | None):
    """Perplexity vs target sparsity (unstructured cells), one line per allocator, log y axis."""
    keys = [k for k in rows if k[0] == method and k[1] == "unstructured"]
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=120)
    for col in cols:
        points = [(k[2], cells[(k, col)]) for k in keys if (k, col) in cells]
        if not points:
            continue
        xs = [100 * x for x, _ in points]
        ys = [s.mean for _, s in points]
        err = [[s.mean - s.lo for _, s in points], [s.hi - s.mean for _, s in points]]
        if any(s.n > 1 for _, s in points):
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=col)
        else:
            ax.plot(xs, ys, marker="o", label=col)
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    ax.set_yscale("log")
    from matplotlib.ticker import LogFormatter

    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("target sparsity (%)")
    ax.set_ylabel(f"{protocol.kind} (log scale)")
    xs = sorted({100 * k[2] for k in keys})
    ax.set_xticks(xs, [f"{x:.4g}" for x in xs])
    ax.set_title(f"{method}: {protocol.title}\n{model}; {calibration_title(example)}", fontsize=8.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="allocator", title_fontsize=8)
    fig.tight_layout()
    return fig


def _items_text(protocol: tuple) -> str:
    counts = {n for _, n, _ in protocol}
    if len(counts) == 1:
        return f"{counts.pop()} items per task"
    return "items per task: " + ", ".join(f"{t} {n}" for t, n, _ in protocol)


def _zero_shot_figure(rows, cols, cells, protocol: tuple, model: str, example: dict, dense: float | None):
    """Zero-shot mean accuracy (%) per row (method with sparsity or N:M), one bar per allocator,
    the dense mean dashed; error bars = min-max over seeds; the y axis is zoomed to the values."""
    plt = _pyplot()
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(max(7.2, 2.4 + len(rows) * max(1.0, 0.28 * len(cols))), 4.4), dpi=120)
    values = [] if dense is None else [100 * dense]
    for i, col in enumerate(cols):
        keys = [k for k in rows if (k, col) in cells]
        stats = [cells[(k, col)] for k in keys]
        xs = [rows.index(k) + (i - (len(cols) - 1) / 2) * width for k in keys]
        ax.bar(xs, [100 * s.mean for s in stats], width * 0.92, label=col)
        spread = [(x, s) for x, s in zip(xs, stats) if s.n > 1]
        if spread:
            ax.errorbar([x for x, _ in spread], [100 * s.mean for _, s in spread], fmt="none", ecolor="black",
                        capsize=2, linewidth=1, yerr=[[100 * (s.mean - s.lo) for _, s in spread],
                                                      [100 * (s.hi - s.mean) for _, s in spread]])
        for x, s in zip(xs, stats):
            ax.annotate(f"{100 * s.mean:.1f}", (x, 100 * s.hi), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=6.5)
        values += [100 * s.hi for s in stats] + [100 * s.lo for s in stats]
    if dense is not None:
        ax.axhline(100 * dense, color="gray", linestyle="--", linewidth=1, label=f"dense ({100 * dense:.2f})")
    bottom = max(0.0, 5 * math.floor((min(values) - 5) / 5))
    ax.set_ylim(bottom, max(values) + 0.12 * (max(values) - bottom))
    ax.set_xticks(range(len(rows)), [row_label(k).replace(" ", "\n", 1) for k in rows])
    ax.set_xlabel("method / sparsity")
    ax.set_ylabel("zero-shot mean accuracy (%)")
    ax.set_title(f"Zero-shot mean over {len(protocol)} task{'s' if len(protocol) > 1 else ''} "
                 f"({_items_text(protocol)}): {model}\n{calibration_title(example)}", fontsize=8.5)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="allocator", title_fontsize=8)
    fig.tight_layout()
    return fig


def _zero_shot_section(records: Sequence[dict], dense: Sequence[dict], report: Report | None) -> list[str]:
    groups = _groups([r for r in records if task_protocol(r)],
                     lambda r: (model_key(r), task_protocol(r), calibration_key(r)))
    if not groups:
        return []
    lines = ["## Zero-shot accuracy", ""]
    for index, ((model, protocol, _), recs) in enumerate(groups.items(), start=1):
        tasks = [t for t, _, _ in protocol]
        described = ", ".join(f"{t} ({metric}, n={n})" for t, n, metric in protocol)
        dense_rec = next((r for r in dense if model_key(r) == model and task_protocol(r) == protocol), None)
        dense_mean = dense_rec["eval"]["tasks_mean"]["value"] if dense_rec else None
        lines += [f"### Zero-shot: {described}", "",
                  (f"Model `{model}`; {calibration_title(recs[0])}; {_seeds_note(recs)}. Accuracy in %, each "
                   f"task's metric of record (lm-eval multiple-choice log-likelihood). Dense mean: "
                   f"{_fmt(100 * dense_mean) if dense_mean is not None else 'not in the results'}. Higher is better."),
                  "", "Mean over the tasks:", ""]
        rows, cols, cells = _pivot(recs, lambda r: r["eval"]["tasks_mean"]["value"], row_key, lambda r: r["label"])
        rows = _row_sort(rows)
        lines += _md_table(["method / sparsity", *cols], _pivot_lines(rows, cols, cells, row_label, False, 100.0))
        lines.append("")
        if report is not None:
            name = f"zero_shot_{index}.png"
            report.figures[name] = _zero_shot_figure(rows, cols, cells, protocol, model, recs[0], dense_mean)
            alt = f"zero-shot mean accuracy per allocator, {model}, {_items_text(protocol)}"
            lines += [f"![{alt}]({report.link(name)})", ""]
        lines += ["Per task:", ""]
        table = []
        if dense_rec:
            table.append(["dense", "-", *[_fmt(100 * dense_rec["eval"]["tasks"][t]["value"]) for t in tasks],
                          _fmt(100 * dense_mean)])
        for key in rows:
            for col in cols:
                subset = [r for r in recs if row_key(r) == key and r["label"] == col]
                if not subset:
                    continue
                per_task = []
                for t in tasks + ["__mean__"]:
                    stat = Stat()
                    for r in subset:
                        ev = r["eval"]
                        value = ev["tasks_mean"]["value"] if t == "__mean__" else ev["tasks"][t]["value"]
                        stat.add(r["config"]["seed"], value)
                    per_task.append(_stat_text(stat, False, None, 100.0))
                table.append([row_label(key), col, *per_task])
        lines += _md_table(["method / sparsity", "allocator", *tasks, "mean"], table)
        lines.append("")
    return lines


NOT_VARIED = "(not affected)"


def _varied_label(record: dict) -> str:
    """The varied axes' values; for a cell of a one-value ablation (nothing varied), the options its
    label names, e.g. ``final=sequential`` of ``search (final=sequential)``."""
    varied = record.get("varied") or {}
    text = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in varied.items())
    if not text and record.get("label", "").endswith(")") and " (" in record["label"]:
        text = record["label"].split(" (", 1)[1][:-1]
    return text or NOT_VARIED


def _base_label(record: dict) -> str:
    """The allocator with its non-varied options: what an ablation column holds fixed."""
    c = record["config"]
    varied = {k.split(".", 1)[1] for k in (record.get("varied") or {})}
    opts = {k: v for k, v in {**c.get("als", {}), **c.get("baselines", {})}.items() if k not in varied}
    extra = ", ".join(f"{k}={v}" for k, v in opts.items())
    return f"{c['allocation']} ({extra})" if extra else c["allocation"]


def _uniform_reference(main: Sequence[dict], recs: Sequence[dict], protocol: Protocol) -> str:
    """The main grid's uniform allocation for each pruner and target of an ablation's cells, under
    the same protocol, calibration set-up and seeds: the value an allocator option has to beat.
    Empty where the ablation varies the calibration (no single reference) or none was run."""
    if len({calibration_key(r) for r in recs}) != 1:
        return ""
    seeds = {r["config"].get("seed", 0) for r in recs}
    found = []
    for key in _row_sort({row_key(r) for r in recs if r["config"]["allocation"] != "uniform"}):
        values = [v for r in main if r["config"]["allocation"] == "uniform" and row_key(r) == key
                  and model_key(r) == model_key(recs[0]) and r["config"].get("seed", 0) in seeds
                  and calibration_key(r) == calibration_key(recs[0]) for p, v in ppl_values(r) if p == protocol]
        if values:
            found.append(f"{row_label(key)} {_fmt(sum(values) / len(values))}")
    return f" Uniform allocation, same pruner, target and calibration: {', '.join(found)}." if found else ""


def _ablation_section(records: Sequence[dict], dense: Sequence[dict], main: Sequence[dict] = ()) -> list[str]:
    if not records:
        return []
    lines = ["## Ablations", ""]
    for name in dict.fromkeys(r["name"] for r in records):
        named = [r for r in records if r["name"] == name]
        axes = sorted({k for r in named for k in (r.get("varied") or {})})
        groups: dict[tuple, list] = {}
        for r in named:
            for protocol, value in ppl_values(r):
                groups.setdefault((model_key(r), protocol), []).append((r, value))
        for (model, protocol), pairs in groups.items():
            recs = [r for r, _ in pairs]
            values = {id(r): v for r, v in pairs}
            rows, cols, cells = _pivot(recs, lambda r, values=values: values[id(r)], _varied_label,
                                       lambda r: f"{row_label(row_key(r))} {_base_label(r)}")
            best: dict[str, float | None] = {}
            calibrations = sorted({calibration_title(r) for r in recs})
            reference = _dense_ppl(dense, model, protocol)
            lines += [f"### Ablation `{name}`: {protocol.title}", "",
                      (f"Varied: {', '.join(axes) or 'nothing'}. Model `{model}`; "
                       f"{'; '.join(calibrations) if len(calibrations) == 1 else 'calibration as varied'}; "
                       f"{_seeds_note(recs)}. Dense: {_fmt(reference) if reference is not None else '-'}."
                       f"{_uniform_reference(main, recs, protocol)} Lower is better; bold = best value in its column."),
                      ""]
            rows = [r for r in rows if r != NOT_VARIED] + [r for r in rows if r == NOT_VARIED]
            table = []
            for c in cols:
                column = {r: cells[(r, c)].mean for r in rows if (r, c) in cells}
                best[c] = min(column.values()) if len(set(column.values())) > 1 else None
            for r in rows:
                table.append([r] + [_stat_text(cells[(r, c)], cells[(r, c)].mean == best[c], None)
                                    if (r, c) in cells else "" for c in cols])
            lines += _md_table([", ".join(a.split(".", 1)[1] for a in axes) or "value", *cols], table)
            lines.append("")
    return lines


def timed_alone(record: dict) -> bool:
    """Whether a record's timings can be trusted: the machine was not busy with other work while
    the cell ran (records from before this was measured count as unknown, hence not)."""
    machine = record.get("machine")
    return isinstance(machine, dict) and machine.get("busy") is False and not record.get("reused_from")


STARVED = 0.75  # a cell whose CPU seconds per wall second fell under this fraction of the sweep's median


def _not_starved(records: list[dict]) -> list[dict]:
    """Drop cells that got markedly less CPU than the sweep's other cells of the same model: other
    work ran during the cell though the load average was low at its start and end."""
    kept = []
    for recs in _groups(records, model_key).values():
        shares = sorted(r["machine"]["cpu_per_wall"] for r in recs if r["machine"].get("cpu_per_wall"))
        if not shares:
            kept += recs
            continue
        median = shares[len(shares) // 2]
        kept += [r for r in recs if (r["machine"].get("cpu_per_wall") or median) >= STARVED * median]
    return kept


def _eval_setup(record: dict) -> str:
    """What a cell's evaluation stage did, in short: its cost depends on it (291 windows take 7x 40)."""
    parts = [f"{p.count} x {p.length} windows" if p.kind == "token-ppl" else f"word-ppl {p.count} docs"
             for p, _ in ppl_values(record)]
    tasks = task_protocol(record)
    if tasks:
        parts.append(f"{len(tasks)} tasks x " + "/".join(map(str, sorted({n for _, n, _ in tasks}))))
    return " + ".join(parts) or "-"


def _cost_section(pruned: Sequence[dict], dense: Sequence[dict]) -> list[str]:
    everything = list(dense) + list(pruned)
    records = _not_starved([r for r in everything if timed_alone(r)])
    if not everything:
        return []
    if not records:
        return ["## Cost", "", f"No cell was timed on an otherwise idle machine ({len(everything)} cells ran beside "
                "other work or before load was recorded), so there is no cost table.", ""]
    present = [s for s in STAGES if any(s in (r.get("timings_s") or {}) for r in records)]
    lines = ["## Cost", "",
             ("Mean wall seconds per cell and stage, for each pruner, allocator and evaluation set-up (windows x "
              "tokens of perplexity, zero-shot tasks x items: the evaluation stage's cost depends on it); pass 1 "
              "averaged over the cells that ran it (the others reused the dense statistics of an earlier cell with "
              "the same calibration); total = the whole cell (load to evaluation); peak RSS = the largest per-cell "
              "peak resident memory of the sweep process (GiB, includes what the sweep keeps between cells)."), ""]
    left_out = len(everything) - len(records)
    if left_out:
        lines += [f"Only cells timed on an otherwise idle machine are counted: {left_out} of {len(everything)} cells "
                  "ran beside other work (1-minute load average above the core count + 0.5 at the cell's start or "
                  f"end, or CPU seconds per wall second under {STARVED:g} x the median of the model's cells), "
                  "before load was recorded, or reused another cell's result; their results stand, their timings "
                  "are left out.", ""]
    for model, recs in _groups(records, model_key).items():
        lines += [f"### `{model}`", ""]
        groups = _groups(recs, lambda r: ("dense", "-", _eval_setup(r)) if r["kind"] == "dense"
                         else (r["config"]["method"], r["label"], _eval_setup(r)))
        table = []
        for key, group in groups.items():
            row = [*key, str(len(group))]
            for stage in present:
                pool = group
                if stage == "pass1":
                    pool = [r for r in group if not r.get("pass1_reused")]
                vals = [r["timings_s"][stage] for r in pool if stage in (r.get("timings_s") or {})]
                row.append(_fmt(sum(vals) / len(vals), 1) if vals else "-")
            walls = [r["wall_s"] for r in group if "wall_s" in r]
            row.append(_fmt(sum(walls) / len(walls), 1) if walls else "-")
            peaks = [r.get("peak_rss_cell_gib") or (r.get("peak_memory") or {}).get("peak_rss_gib") for r in group]
            peaks = [p for p in peaks if p is not None]
            row.append(_fmt(max(peaks), 2) if peaks else "-")
            table.append(row)
        lines += _md_table(["method", "allocator", "evaluation", "cells", *[f"{s} s" for s in present], "total s",
                            "peak RSS GiB"], table)
        lines.append("")
        lines += _stage_peaks_table(groups)
        lines += _allocator_cost_table(recs)
        lines += _als_overhead_table(recs)
    return lines


def _pruning_seconds(record: dict, fresh_pass1: Mapping[str, float]) -> Optional[float]:
    """A cell's pruning work (every stage but loading, calibration sampling and evaluation), as one
    ``alsparse prune`` would pay it: a pass 1 the sweep reused from an earlier cell is counted at the
    mean of the cells of the same allocator that ran theirs in a stage of its own (pass 1 runs on the
    dense model: the pruner does not change it); None when there is no such cell. A searched
    allocation collecting pass 1 on its level database's stream has no pass-1 stage: the time is in
    its search stage."""
    timings = record.get("timings_s") or {}
    total = sum(v for k, v in timings.items() if k not in NOT_PRUNING)
    if record.get("pass1_reused") and "pass1" in timings:
        if record["label"] not in fresh_pass1:
            return None
        total += fresh_pass1[record["label"]] - timings["pass1"]
    return total


def _allocator_cost_table(records: Sequence[dict]) -> list[str]:
    """Each allocator's pruning work as a multiple of one uniform prune of the same pruner (the
    unnamed uniform cells of the same model in this sweep, timed alone); each ablation's cells are
    rows of their own."""
    pruned = [r for r in records if r["kind"] != "dense" and r.get("timings_s")]
    ran = _groups([r for r in pruned if not r.get("pass1_reused") and "pass1" in r["timings_s"]], lambda r: r["label"])
    fresh = {label: sum(r["timings_s"]["pass1"] for r in group) / len(group) for label, group in ran.items()}
    groups = _groups(pruned, lambda r: (r["config"]["method"], r["label"], r.get("name") or ""))
    uniform = {}
    for (method, label, name), group in groups.items():
        if label == "uniform" and not name:
            uniform[method] = [_pruning_seconds(r, fresh) for r in group]
    if not any(label != "uniform" or name for _, label, name in groups) or not uniform:
        return []
    table, unknown = [], 0
    for (method, label, name), group in groups.items():
        seconds = [_pruning_seconds(r, fresh) for r in group]
        if any(x is None for x in seconds):
            unknown += 1
            table.append([method, f"[{name}] {label}" if name else label, str(len(group)), "-", "-", "-"])
            continue
        mean = sum(seconds) / len(seconds)
        base = uniform.get(method)
        ratio = f"{mean / (sum(base) / len(base)):.1f}x" if base else "-"
        spread = f"{min(seconds):.0f}-{max(seconds):.0f}" if len(seconds) > 1 else f"{mean:.0f}"
        table.append([method, f"[{name}] {label}" if name else label, str(len(group)), _fmt(mean, 1), spread, ratio])
    note = (f" {unknown} row(s) reused a pass 1 no cell of their allocator ran in a stage of its own: no figure."
            if unknown else "")
    return ["Each allocator's cost as a multiple of one uniform prune of the same pruner in this sweep (the "
            "main grid's uniform cells): pruning seconds = every stage of the cell but loading, calibration "
            "sampling and evaluation (pass 1, any strength search or searched allocation, the pruning pass, the "
            "held-out scoring); a pass 1 the sweep reused from an earlier cell is counted at the mean of the "
            "same allocator's cells that ran it, as one `alsparse prune` would pay it; [name] = an ablation's "
            "cells." + note, "",
            *_md_table(["method", "allocator", "cells", "pruning s", "range s", "x uniform"], table), ""]


def _stage_peaks_table(groups: Mapping[tuple, list[dict]]) -> list[str]:
    """Peak resident memory per stage: the largest over a row's cells that recorded it."""
    present = [s for s in STAGES if any(s in (r.get("stage_peak_rss_gib") or {}) for g in groups.values() for r in g)]
    if not present:
        return []
    table = []
    for key, group in groups.items():
        row = list(key)
        for stage in present:
            vals = [r["stage_peak_rss_gib"][stage] for r in group if stage in (r.get("stage_peak_rss_gib") or {})]
            row.append(_fmt(max(vals), 2) if vals else "-")
        if any(v != "-" for v in row[len(key):]):
            table.append(row)
    return ["Peak resident memory per stage (GiB, the largest over the row's cells): Linux's high-water mark is "
            "reset when a stage starts, so each figure is that stage's own peak, including what the process "
            "already held (the model, cached statistics). Rows whose cells ran before stage peaks were recorded "
            "are left out.", "",
            *_md_table(["method", "allocator", "evaluation", *[f"{s} GiB" for s in present]], table), ""]


def _als_overhead_table(records: Sequence[dict]) -> list[str]:
    """What ALS adds to a pruner: pass 1 (the dense statistics and RM summaries) plus the LP, as a
    fraction of that pruner's pruning stage. Pass 1 runs on the dense model, so its time is the same
    whatever the pruner: it is averaged over every default-ALS cell that ran it (a sweep reuses it
    between cells; a single ``alsparse prune`` pays it once)."""
    als = [r for r in records if r["kind"] != "dense" and r["label"] == "als" and not r.get("name")]
    ran_pass1 = [r["timings_s"]["pass1"] for r in als if not r.get("pass1_reused") and "pass1" in r["timings_s"]]
    if not als or not ran_pass1:
        return []
    pass1 = sum(ran_pass1) / len(ran_pass1)
    table = []
    for method, group in _groups(als, lambda r: r["config"]["method"]).items():
        lp = sum(r["timings_s"].get("allocation", 0.0) for r in group) / len(group)
        prune = sum(r["timings_s"]["prune"] for r in group) / len(group)
        table.append([method, str(len(group)), _fmt(pass1, 1), _fmt(lp, 2), _fmt(prune, 1),
                      f"{100 * (pass1 + lp) / prune:.0f}%"])
    return [f"ALS overhead: pass 1 (mean of {len(ran_pass1)} default-ALS cells that ran it; it runs on the dense "
            "model, so it is the same for every pruner) plus the LP, against the pruning stage of the same "
            "pruner's ALS cells.", "",
            *_md_table(["method", "ALS cells", "pass 1 s", "LP s", "pruning s", "overhead / pruning"], table), ""]


# --- figures of chosen cells -------------------------------------------------------------------

CELL_PREFIX = 6  # the shortest id prefix `--cell` accepts
CELL_FIGURES = {  # the names alsparse.plots.write_plots gives a cell's figures -> what each shows
    "allocation.png": "allocated sparsity per block (bars) against the target sparsity (dashed line)",
    "allocation_linears.png": "allocated sparsity per linear layer (blocks x linears heat map)",
    "block_rm.png": "RM heat map: the Redundancy Metric RM(i, j) between every pair of blocks",
    "linear_rm.png": "RM heat map: the Redundancy Metric RM(i, j) between every pair of linear layers",
}


def find_cell(records: Sequence[dict], ident: str) -> dict:
    """The record whose id is ``ident``, else the only one whose id starts with it (at least
    CELL_PREFIX characters); anything else is a ValueError saying how many ids matched."""
    exact = [r for r in records if r["id"] == ident]
    if exact:
        return exact[0]
    matches = [r["id"] for r in records if r["id"].startswith(ident)]
    if len(ident) < CELL_PREFIX:
        raise ValueError(f"cell {ident!r}: no cell id is exactly {ident!r} and a prefix needs at least "
                         f"{CELL_PREFIX} characters ({len(matches)} of {len(records)} ids start with it)")
    if len(matches) != 1:
        listed = f": {', '.join(matches[:10])}{' ...' if len(matches) > 10 else ''}" if matches else ""
        raise ValueError(f"cell {ident!r}: {len(matches)} of {len(records)} cell ids match{listed}; "
                         f"give the exact id or a unique prefix of at least {CELL_PREFIX} characters")
    return next(r for r in records if r["id"] == matches[0])


def _cell_description(record: dict) -> str:
    c = record["config"]
    target = f"N:M pattern {c['pattern']}" if c["pattern"] != "unstructured" else f"sparsity {_percent(c['sparsity'])}"
    ablation = f"ablation `{record['name']}` ({_varied_label(record)}): " if record.get("name") else ""
    ppl = [f"{p.title}: {_fmt(v)}" for p, v in ppl_values(record) if p.kind == "token-ppl"]
    return (f"{ablation}{c['method']}, allocator {record['label']}, {target}, calibration seed {c.get('seed', 0)}; "
            f"{'; '.join(ppl) or 'no token-ppl evaluated'}.")


def _cells_section(records: Sequence[dict], idents: Sequence[str], report: Report) -> list[str]:
    """Per chosen cell: a description and its sweep figures (recorded in report.copies)."""
    chosen = {r["id"]: r for r in (find_cell(records, i) for i in idents)}
    if not chosen:
        return []
    lines = ["## Figures of chosen cells", ""]
    for cell_id, record in chosen.items():
        if not record.get("plots"):
            raise ValueError(f"cell {cell_id}: its record lists no figures (a dense cell, or a sweep run "
                             "without plots_dir)")
        lines += [f"### Cell `{cell_id}`", "", _cell_description(record), ""]
        for path in map(Path, record["plots"]):
            name = f"cell_{cell_id}_{path.name}"
            if path.is_file():
                report.copies[name] = path
            elif (draw := _redraw(record, path.name)) is not None:
                report.redrawn[name] = draw  # from the numbers in the record (the plots_dir is gone)
            else:
                raise ValueError(f"cell {cell_id}: figure {path} does not exist (the sweep wrote it under its "
                                 f"plots_dir; a relative path is relative to the directory the sweep ran in)")
            caption = CELL_FIGURES.get(path.name, path.stem.replace("_", " "))
            lines += [f"![{caption}]({report.link(name)})", "", f"*{caption}.*", ""]
    return lines


def _redraw(record: dict, name: str) -> Callable[[Any], Any] | None:
    """Draw a cell's figure again from its record, where the record holds what it shows: the
    allocation bars, and the block RM heat map (recorded for block-level ALS cells)."""
    from .plots import allocation_bars, rm_heatmap

    allocation = record.get("allocation") or {}
    if name == "block_rm.png" and allocation.get("block_rm"):
        return lambda f: rm_heatmap(allocation["block_rm"], f, "RM between blocks")
    if name == "allocation.png" and allocation.get("units") and allocation.get("sparsity"):
        units = [str(i) for i in range(len(allocation["units"]))]
        title = (f"{record['label']} allocation, {record['config']['method']}, "
                 f"mean {record.get('allocated_sparsity', allocation.get('mean_sparsity', 0)):.3f}")
        return lambda f: allocation_bars(units, allocation["sparsity"], record["config"]["sparsity"], f, title)
    return None


# --- writing ----------------------------------------------------------------------------------


def write_report(records: Sequence[dict], out_dir: str | os.PathLike[str], sources: Sequence[str] = (),
                 figures_dir: str | os.PathLike[str] | None = None, cells: Sequence[str] = (),
                 preamble: str = "", command: str = "") -> list[Path]:
    """RESULTS.md under ``out_dir`` and its PNGs under ``out_dir/figures_dir`` (default: beside it),
    each written to a temporary file and renamed; RESULTS.md first in the list, written last.
    cells: ids (or unique prefixes) whose sweep figures are copied in as cell_<id>_<name>.png."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / figures_dir if figures_dir else out_dir
    link = Path(os.path.relpath(fig_dir, out_dir)).as_posix()
    try:
        _pyplot()
        figures = True
    except ImportError:
        log.warning("matplotlib is not installed: tables only (pip install 'alsparse[plots]')")
        figures = False
    report = build_report(records, sources, figures=figures, figures_dir="" if link == "." else link, cells=cells,
                          preamble=preamble, command=command)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    plt = _pyplot() if figures else None
    for name, fig in report.figures.items():
        written.append(_atomic(fig_dir / name, lambda f, fig=fig: fig.savefig(f, format="png", bbox_inches="tight")))
        plt.close(fig)
    for name, source in report.copies.items():
        written.append(_atomic(fig_dir / name, lambda f, source=source: f.write(source.read_bytes())))
    for name, draw in report.redrawn.items():
        written.append(_atomic(fig_dir / name, draw))
    written.insert(0, _atomic(out_dir / "RESULTS.md", lambda f: f.write(report.markdown.encode())))
    return written


def _atomic(path: Path, write: Callable[[Any], None]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
