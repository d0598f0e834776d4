"""Sweeps: a YAML grid of prune-then-evaluate cells, run one at a time, each finished cell appended as
one JSON line to a results file; a rerun skips the cells already there (docs/SWEEPS.md).

    spec = load_spec("benchmarks/sweeps/smollm2.yaml")
    outcome = run_sweep(spec, limit_cells=10)

Every cell starts from a freshly loaded dense model. Calibration windows are sampled once per
(corpus, nsamples, seqlen, seed) and the dense statistics pass (pass 1) is shared between cells
through ``prune_(..., pass1_cache=...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
import typing
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import prune_  # a module attribute: tests count the prunes through it
from .config import ALSOptions, BaselineOptions, Pattern, PruneConfig, SearchOptions, search_database, search_final
from .results import read_records

log = logging.getLogger(__name__)

TOP_KEYS = ("model", "dtype", "compute_dtype", "device", "batch_size", "offload", "trust_remote_code", "calibration",
            "eval", "grid", "dense", "plots_dir", "results", "pass1_cache_entries")
ENTRY_KEYS = ("name", "methods", "allocations", "sparsities", "patterns", "als", "baselines", "search", "calibration",
              "eval", "allocation_file")
CALIBRATION_KEYS = ("corpus", "nsamples", "seqlen", "seeds")
EVAL_KEYS = ("ppl", "tasks", "seq_len", "limit", "task_limit", "batch_size", "word_ppl")
CALIBRATION_DEFAULTS = {"corpus": "wikitext2", "nsamples": 32, "seqlen": 1024, "seeds": [0]}
# which allocator a baseline option belongs to, by the option's prefix (unknown prefixes: every non-uniform one)
BASELINE_OWNERS = {"owl": "owl", "dlp": "dlp", "alpha": "alphapruning", "atp": "atp"}


class SweepConfigError(ValueError):
    """The sweep YAML is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Calibration:
    corpus: str
    nsamples: int
    seqlen: int
    seed: int

    def key(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "nsamples": self.nsamples, "seqlen": self.seqlen}


@dataclass(frozen=True)
class Cell:
    """One unit of work: the dense model evaluated, or one pruned configuration evaluated."""

    kind: str  # "dense" | "pruned"
    model: str
    dtype: str
    eval: Mapping[str, Any]  # EvalConfig fields
    name: str | None = None  # the grid entry's name (ablations)
    prune: PruneConfig | None = None
    calibration: Calibration | None = None
    als: Mapping[str, Any] = field(default_factory=dict)  # overrides that matter to this cell
    baselines: Mapping[str, Any] = field(default_factory=dict)
    varied: Mapping[str, Any] = field(default_factory=dict)  # "als.delta": 0.1, "calibration.nsamples": 8
    compute: str = "float32"  # the compute dtype, resolved when the sweep is planned (never "auto")
    search: Mapping[str, Any] = field(default_factory=dict)  # SearchOptions overrides (allocation "search" only)

    def config(self) -> dict[str, Any]:
        """The cell's configuration as recorded (and hashed): no device, no batch sizes. The compute
        dtype is named when it is not float32 (what every cell computed in before it was an option,
        so those ids stay)."""
        out: dict[str, Any] = {"model": self.model, "dtype": self.dtype}
        if self.compute != "float32":
            out["compute_dtype"] = self.compute
        if self.kind == "pruned":
            p = self.prune
            out.update(method=p.method, allocation=p.allocation, sparsity=round(float(p.sparsity), 10),
                       pattern=p.pattern, seed=p.seed, calibration=self.calibration.key(), als=dict(self.als),
                       baselines=dict(self.baselines), allocation_file=p.allocation_file)
            if self.search:  # named only when set, so the ids of cells recorded before the option stay
                out["search"] = dict(self.search)
        return out

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "config": self.config(), "eval": _eval_identity(self.eval)}

    @property
    def work_key(self) -> str:
        """What the cell computes, whatever table it is planned for: two cells with the same key
        (an ablation's default value and the main grid's cell) give the same numbers."""
        return _work_key(self.config(), self.eval)

    @property
    def id(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def allocator_label(self) -> str:
        """'als', 'als (solver=qp)': the allocation with the options that differ from the defaults."""
        if self.kind == "dense":
            return "dense"
        search = {k: v for k, v in self.search.items() if k not in _RESOLVED_PER_PRUNER}
        if self.prune.allocation == "search":
            for key, resolve in _RESOLVED_PER_PRUNER.items():
                way = resolve(getattr(self.prune.search, key), self.prune.method)
                if way != resolve("auto", self.prune.method):
                    search[key] = way
        opts = {**self.als, **self.baselines, **search}
        extra = ", ".join(f"{k}={v}" for k, v in opts.items())
        return f"{self.prune.allocation} ({extra})" if extra else self.prune.allocation

    def describe(self) -> str:
        if self.kind == "dense":
            return f"dense {self.model}"
        p = self.prune
        target = p.pattern if p.parsed_pattern.is_nm else f"{p.sparsity:g}"
        name = f"[{self.name}] " if self.name else ""
        calib = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in self.varied.items() if k.startswith("calibration."))
        return f"{name}{p.method} {self.allocator_label} {target} seed {p.seed}" + (f" ({calib})" if calib else "")


@dataclass(frozen=True)
class SweepSpec:
    model: str
    cells: tuple[Cell, ...]
    dtype: str = "float32"
    compute_dtype: str = "float32"  # resolved
    device: str | None = None
    batch_size: int = 4
    offload: str = "device"
    trust_remote_code: bool = False
    plots_dir: Path | None = None
    results: Path | None = None
    pass1_cache_entries: int = 3


# --- parsing and validation -----------------------------------------------------------------


def load_spec(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and validate a sweep YAML; the default results file is <config>.results.jsonl beside it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"{path} is not valid YAML: {exc}") from None
    spec = parse_spec(raw)
    if spec.results is None:
        spec = dataclasses.replace(spec, results=path.with_name(path.stem + ".results.jsonl"))
    return spec


def parse_spec(raw: Any) -> SweepSpec:
    """Validate a parsed YAML mapping and expand its grid into cells, in YAML order.

    One dense cell per evaluation set-up, placed just before the first pruned cell evaluated that way, so
    an entry at the end of the grid (say, a costlier evaluation) does not delay the others.
    """
    from .sources import DTYPES

    if not isinstance(raw, dict):
        raise SweepConfigError(f"a sweep config must be a mapping with keys {', '.join(TOP_KEYS)}; "
                               f"got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, "sweep config")
    for key in ("model", "grid"):
        if key not in raw:
            raise SweepConfigError(f"sweep config: missing required key {key!r}")
    model = raw["model"]
    if not isinstance(model, str) or not model:
        raise SweepConfigError(f"model must be a model reference string, got {model!r}")
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise SweepConfigError(f"dtype {dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
    batch_size = _positive_int(raw.get("batch_size", 4), "batch_size")
    offload = raw.get("offload", "device")
    if offload not in ("device", "cpu"):
        raise SweepConfigError(f"offload {offload!r} is not valid; choose one of: device, cpu")
    device = raw.get("device")
    if device in ("auto", ""):
        device = None
    compute_dtype = _compute_dtype(raw.get("compute_dtype", "auto"), device, DTYPES[dtype])
    cache_entries = _positive_int(raw.get("pass1_cache_entries", 3), "pass1_cache_entries")
    calibration = _calibration_section(raw.get("calibration") or {}, "calibration", CALIBRATION_DEFAULTS)
    eval_base = _eval_section(raw.get("eval") or {}, "eval", {})
    grid = raw["grid"]
    if not isinstance(grid, list) or not grid:
        raise SweepConfigError("grid must be a non-empty list of entries (each with methods, allocations, sparsities)")
    cells: list[Cell] = []
    for i, entry in enumerate(grid):
        cells.extend(_expand_entry(entry, f"grid[{i}]", model, dtype, batch_size, offload, calibration, eval_base))
    cells = [dataclasses.replace(c, compute=compute_dtype,
                                 prune=dataclasses.replace(c.prune, compute_dtype=compute_dtype)) for c in cells]
    if not isinstance(raw.get("dense", True), bool):
        raise SweepConfigError(f"dense must be true or false, got {raw['dense']!r}")
    unique: dict[str, Cell] = {}
    for cell in cells:
        if raw.get("dense", True):  # each evaluation set-up's dense cell runs just before its first pruned cell
            dense = Cell("dense", model, dtype, cell.eval, compute=compute_dtype)
            unique.setdefault(dense.id, dense)
        unique.setdefault(cell.id, cell)
    return SweepSpec(
        model=model, cells=tuple(unique.values()), dtype=dtype, compute_dtype=compute_dtype, device=device,
        batch_size=batch_size, offload=offload,
        trust_remote_code=bool(raw.get("trust_remote_code", False)),
        plots_dir=Path(raw["plots_dir"]) if raw.get("plots_dir") else None,
        results=Path(raw["results"]) if raw.get("results") else None,
        pass1_cache_entries=cache_entries,
    )


def _compute_dtype(requested: Any, device: str | None, weights) -> str:
    """The compute dtype every cell runs in, resolved on this machine now: a sweep's tables hold one
    compute dtype, and a sweep continued where ``auto`` resolves otherwise plans other cells."""
    from . import compute
    from .config import check_compute_dtype

    try:
        check_compute_dtype(requested)
        return compute.name(compute.resolve(requested, _torch_device(_resolve_device(device)), weights))
    except ValueError as exc:
        raise SweepConfigError(f"compute_dtype: {exc}") from None


def _check_keys(section: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for key in section:
        if key not in allowed:
            raise SweepConfigError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SweepConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def _as_list(value: Any, where: str) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise SweepConfigError(f"{where} must not be empty")
    return values


def _calibration_section(section: Any, where: str, base: Mapping[str, Any]) -> dict[str, list]:
    """Calibration keys -> lists of values (every key may be a list: an axis of the grid)."""
    from .data.text import CORPORA, is_text_path

    if not isinstance(section, dict):
        raise SweepConfigError(f"{where} must be a mapping with keys {', '.join(CALIBRATION_KEYS)}")
    _check_keys(section, CALIBRATION_KEYS, where)
    merged = {k: _as_list(v, f"{where}.{k}") for k, v in {**base, **section}.items()}
    for corpus in merged["corpus"]:
        known = isinstance(corpus, str) and (corpus in CORPORA or (is_text_path(corpus) and Path(corpus).is_file()))
        if not known:
            raise SweepConfigError(f"{where}.corpus: {corpus!r} is neither a registered corpus "
                                   f"({', '.join(CORPORA.names())}) nor an existing text file")
    for key in ("nsamples", "seqlen"):
        for value in merged[key]:
            _positive_int(value, f"{where}.{key}")
    for value in merged["seqlen"]:
        if value < 2:
            raise SweepConfigError(f"{where}.seqlen must be >= 2, got {value}")
    for value in merged["seeds"]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SweepConfigError(f"{where}.seeds must be non-negative integers, got {value!r}")
    return merged


def _eval_section(section: Any, where: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluation keys merged over ``base`` and validated by building an EvalConfig."""
    from .eval import EvalConfig

    if not isinstance(section, dict):
        raise SweepConfigError(f"{where} must be a mapping with keys {', '.join(EVAL_KEYS)}")
    _check_keys(section, EVAL_KEYS, where)
    merged = {**base, **section}
    for key in ("ppl", "tasks"):
        if key in merged:
            value = merged[key]
            merged[key] = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else value
            if not isinstance(merged[key], list):
                raise SweepConfigError(f"{where}.{key} must be a list of names, got {value!r}")
    try:
        cfg = EvalConfig(**merged)
    except (ValueError, TypeError) as exc:
        raise SweepConfigError(f"{where}: {exc}") from None
    if not cfg.ppl and not cfg.tasks and not cfg.word_ppl:
        raise SweepConfigError(f"{where}: nothing to evaluate (ppl, tasks and word_ppl are all empty)")
    out = dataclasses.asdict(cfg)
    out.pop("compute_dtype")  # the sweep's own (top-level, resolved), part of the cell's config instead
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _options(section: Any, cls, where: str) -> dict[str, list]:
    """An ALSOptions / BaselineOptions override mapping -> option -> list of values (lists are axes)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise SweepConfigError(f"{where} must be a mapping of option -> value (or list of values)")
    fields = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in section.items():
        if key not in fields:
            raise SweepConfigError(f"{where}: unknown option {key!r}; choose one of: {', '.join(fields)}")
        out[key] = [_coerce(v, hints[key], f"{where}.{key}") for v in _as_list(value, f"{where}.{key}")]
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """YAML 1.1 reads '1e-3' as a string: numbers given as strings become numbers for numeric options."""
    args = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) not in args:
            raise SweepConfigError(f"{where} cannot be null")
        return None
    if float in args and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise SweepConfigError(f"{where} must be a number, got {value!r}") from None
    if int in args and (not isinstance(value, int) or isinstance(value, bool)):
        raise SweepConfigError(f"{where} must be an integer, got {value!r}")
    if str in args and not isinstance(value, str):
        raise SweepConfigError(f"{where} must be a string, got {value!r}")
    return value


def _names(section: Mapping, key: str, where: str, registry) -> list[str]:
    if key not in section:
        raise SweepConfigError(f"{where}: missing required key {key!r}")
    values = _as_list(section[key], f"{where}.{key}")
    for value in values:
        if value not in registry:
            try:
                registry.get(str(value))
            except ValueError as exc:
                raise SweepConfigError(f"{where}.{key}: {exc}") from None
    return values


def _expand_entry(entry: Any, where: str, model: str, dtype: str, batch_size: int, offload: str,
                  calibration: Mapping[str, list], eval_base: Mapping[str, Any]) -> list[Cell]:
    from .allocate import ALLOCATORS
    from .pruning import PRUNERS

    if not isinstance(entry, dict):
        raise SweepConfigError(f"{where} must be a mapping with keys {', '.join(ENTRY_KEYS)}")
    _check_keys(entry, ENTRY_KEYS, where)
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise SweepConfigError(f"{where}.name must be a non-empty string, got {name!r}")
    methods = _names(entry, "methods", where, PRUNERS)
    allocations = _names(entry, "allocations", where, ALLOCATORS)
    patterns = []
    for text in _as_list(entry.get("patterns", "unstructured"), f"{where}.patterns"):
        try:
            patterns.append(Pattern.parse(str(text)))
        except ValueError as exc:
            raise SweepConfigError(f"{where}.patterns: {exc}") from None
    if "sparsities" in entry:
        sparsities = _as_list(entry["sparsities"], f"{where}.sparsities")
    elif all(p.is_nm for p in patterns):
        sparsities = [None]  # N:M fixes the sparsity at N/M
    else:
        raise SweepConfigError(f"{where}: missing required key 'sparsities' (only N:M patterns may omit it)")
    for s in sparsities:
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1):
            raise SweepConfigError(f"{where}.sparsities: sparsity must be in [0, 1), got {s!r}")
    if "file" in allocations and not entry.get("allocation_file"):
        raise SweepConfigError(f"{where}: allocation 'file' needs allocation_file (a JSON/YAML mapping)")
    als_axes = _options(entry.get("als"), ALSOptions, f"{where}.als")
    base_axes = _options(entry.get("baselines"), BaselineOptions, f"{where}.baselines")
    search_axes = _options(entry.get("search"), SearchOptions, f"{where}.search")
    for key in ("stages", "warm_start"):
        if key in search_axes:
            raise SweepConfigError(f"{where}.search.{key}: not an axis a sweep varies (set it in PruneConfig)")
    calib_axes = _calibration_section(entry.get("calibration") or {}, f"{where}.calibration", calibration)
    eval_cfg = _eval_section(entry.get("eval") or {}, f"{where}.eval", eval_base)
    axes = {**{f"als.{k}": v for k, v in als_axes.items()}, **{f"baselines.{k}": v for k, v in base_axes.items()},
            **{f"search.{k}": v for k, v in search_axes.items()},
            **{f"calibration.{k}": v for k, v in calib_axes.items() if k != "seeds"}}
    cells = []
    for seed in calib_axes["seeds"]:
        for combo in _product(axes):
            for method, pattern, sparsity, allocation in itertools.product(methods, patterns, sparsities, allocations):
                cells.append(_make_cell(where, name, model, dtype, batch_size, offload, eval_cfg, seed, combo, axes,
                                        method, pattern, sparsity, allocation, entry.get("allocation_file")))
    return cells


def _product(axes: Mapping[str, list]) -> Iterator[dict[str, Any]]:
    keys = list(axes)
    for values in itertools.product(*(axes[k] for k in keys)):
        yield dict(zip(keys, values))


def _relevant(option: str, allocation: str) -> bool:
    """Whether an option changes the result of this allocation (irrelevant ones are dropped from ids)."""
    group, name = option.split(".", 1)
    if group == "calibration":
        return True
    if group == "als":
        return allocation == "als"
    if group == "search":
        return allocation == "search"
    owner = BASELINE_OWNERS.get(name.split("_", 1)[0])
    return allocation == owner if owner else allocation not in ("uniform", "als", "file")


def _make_cell(where, name, model, dtype, batch_size, offload, eval_cfg, seed, combo, axes, method, pattern, sparsity,
               allocation, allocation_file) -> Cell:
    als = {k[4:]: v for k, v in combo.items() if k.startswith("als.")}
    base = {k[10:]: v for k, v in combo.items() if k.startswith("baselines.")}
    search = {k[7:]: v for k, v in combo.items() if k.startswith("search.")}
    try:
        config = PruneConfig(
            method=method, allocation=allocation, pattern=str(pattern),
            sparsity=pattern.sparsity if sparsity is None else float(sparsity), seed=seed,
            allocation_file=allocation_file if allocation == "file" else None, batch_size=batch_size, offload=offload,
            als=dataclasses.replace(_IDENTITY_ALS, **als), baselines=BaselineOptions(**base),
            search=SearchOptions(**search),
        )
    except (ValueError, TypeError) as exc:
        raise SweepConfigError(f"{where}: {exc}") from None
    calib = Calibration(combo.get("calibration.corpus"), combo.get("calibration.nsamples"),
                        combo.get("calibration.seqlen"), seed)
    defaults_als, defaults_base = _IDENTITY_ALS, BaselineOptions()
    als_kept = {k: v for k, v in als.items() if _relevant(f"als.{k}", allocation) and getattr(defaults_als, k) != v}
    base_kept = {k: v for k, v in base.items()
                 if _relevant(f"baselines.{k}", allocation) and getattr(defaults_base, k) != v}
    search_kept = {k: v for k, v in search.items() if k not in _RESOLVED_PER_PRUNER
                   and _relevant(f"search.{k}", allocation) and getattr(SearchOptions(), k) != v}
    if allocation == "search":
        for key, resolve in _RESOLVED_PER_PRUNER.items():
            way = resolve(getattr(config.search, key), method)
            if way != _IDENTITY_SEARCH[key]:
                search_kept[key] = way
    varied = {k: combo[k] for k, values in axes.items() if len(values) > 1 and _relevant(k, allocation)}
    return Cell("pruned", model, dtype, eval_cfg, name, config, calib, als_kept, base_kept, varied, search=search_kept)


# A sweep's ALS options start from these, and a cell's identity keeps the ones that differ. The
# solver default was the LP when the SmolLM2 grid was recorded; its records (als: {}) mean the LP,
# so in a sweep file an unnamed solver stays the LP and graded ALS is "als (solver=graded)": old
# ids and labels keep their meaning (docs/SWEEPS.md).
_IDENTITY_ALS = ALSOptions(solver="lp")
# The searched allocation's options whose ``auto`` resolves per pruner: when the first search cells
# were recorded (search: {}) every pruner's final model was made sequentially from a level database
# of dense inputs. A cell's identity names such an option (auto resolved) only when it differs from
# that, so cells keep their ids while their work is unchanged and get new ones when a default moved
# (Wanda's final model, now assembled; SparseGPT's database, now sequential). A label names it only
# when it is not the pruner's default (docs/SWEEPS.md).
_RESOLVED_PER_PRUNER = {"final": search_final, "database": search_database}
_IDENTITY_SEARCH = {"final": "sequential", "database": "dense"}


def _eval_identity(eval_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation settings that change results (batch size does not)."""
    return {k: v for k, v in eval_cfg.items() if k != "batch_size"}


def _work_key(config: Mapping[str, Any], eval_cfg: Mapping[str, Any]) -> str:
    return json.dumps({"config": config, "eval": _eval_identity(eval_cfg)}, sort_keys=True, separators=(",", ":"),
                      default=str)


def _reused(cell: Cell, record: Mapping[str, Any]) -> dict[str, Any]:
    """A finished record of the same work, filed under ``cell`` (its id, name, label and varied
    axes); ``reused_from`` names the record it copies, and its timings leave the cost table."""
    out = dict(record)
    out.update(id=cell.id, name=cell.name, label=cell.allocator_label, varied=dict(cell.varied),
               reused_from=record.get("reused_from") or record["id"],
               finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return out


# --- the results file -------------------------------------------------------------------------


def append_record(handle, record: Mapping[str, Any]) -> None:
    """One complete JSON line, flushed and fsynced: a kill leaves at most one partial last line."""
    handle.write(json.dumps(record, default=str) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _open_results(path: Path):
    """Open for appending (the caller holds the file's lock), after cutting off a partial last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
    records, valid_bytes = read_records(path, with_offset=True)
    if valid_bytes < path.stat().st_size:
        handle.truncate(valid_bytes)
        log.warning("%s: removed an incomplete last line (an interrupted write); its cell will be redone", path)
    return handle, records


# --- running ----------------------------------------------------------------------------------


class LRUCache(MutableMapping):
    """A bounded mapping (least recently used entry evicted) that counts hits: the pass-1 cache."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict = OrderedDict()
        self.hits = 0

    def __getitem__(self, key):
        value = self._data[key]
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def get(self, key, default=None):
        return self[key] if key in self._data else default

    def __setitem__(self, key, value) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __delitem__(self, key) -> None:
        del self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class SweepOutcome:
    results: Path
    planned: int
    already_done: int
    computed: list[str] = field(default_factory=list)  # cell ids, in order
    failed: list[str] = field(default_factory=list)
    remaining: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"results": str(self.results), "planned": self.planned, "already_done": self.already_done,
                "computed": len(self.computed), "failed": len(self.failed), "remaining": self.remaining}


def plan(spec: SweepSpec, results: Path | None = None) -> tuple[list[Cell], set[str]]:
    """The planned cells and the ids already in the results file (read only; nothing is repaired)."""
    path = Path(results or spec.results)
    done = {r["id"] for r in read_records(path)} if path.is_file() else set()
    return list(spec.cells), done


class _ResultsFile:
    """The results file held open (and locked) for a run. Each append first checks that the path
    still names the file held open: if something replaced or removed it mid-run (``git stash``,
    ``git checkout``, an editor's save), appending to the old handle would write into a deleted
    file and lose every later record. Instead it reopens the path and re-appends this run's records
    that the new file lacks."""

    def __init__(self, path: Path):
        from .locks import exclusive, lock_path_for

        self.path = path
        self._lock = contextlib.ExitStack()  # a second sweep on this file is refused (InUseError)
        self._lock.enter_context(exclusive(lock_path_for(path), f"results file {path}"))
        try:
            self.handle, self.records = _open_results(path)
        except BaseException:
            self._lock.close()
            raise
        self.written: list[Mapping[str, Any]] = []

    def _replaced(self) -> bool:
        held = os.fstat(self.handle.fileno())
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def append(self, record: Mapping[str, Any]) -> None:
        if self._replaced():
            self.handle.close()
            self.handle, present = _open_results(self.path)
            ids = {r.get("id") for r in present}
            missing = [r for r in self.written if r.get("id") not in ids]
            log.warning("%s was replaced or removed while the sweep ran; reopened it and re-appended the %d "
                        "record(s) of this run it lacked", self.path, len(missing))
            for r in missing:
                append_record(self.handle, r)
        append_record(self.handle, record)
        self.written.append(record)

    def close(self) -> None:
        self.handle.close()
        self._lock.close()


def run_sweep(spec: SweepSpec, results: Path | None = None, limit_cells: int | None = None,
              keep_going: bool = False, progress: bool = True) -> SweepOutcome:
    """Compute every planned cell that is not yet in the results file (at most ``limit_cells`` of them)."""
    if limit_cells is not None and limit_cells < 1:
        raise SweepConfigError(f"--limit-cells must be >= 1, got {limit_cells}")
    path = Path(results or spec.results or "sweep.results.jsonl")
    results_file = _ResultsFile(path)
    records = results_file.records
    try:
        done = {r["id"] for r in records}
        by_work = {_work_key(r["config"], r["eval_config"]): r for r in records if "eval_config" in r}
        todo = [c for c in spec.cells if c.id not in done]
        outcome = SweepOutcome(path, len(spec.cells), len(spec.cells) - len(todo))
        log.info("sweep: %d cells planned, %d already in %s, %d to compute", outcome.planned, outcome.already_done,
                 path, len(todo))
        batch = todo if limit_cells is None else todo[:limit_cells]
        runner = _Runner(spec)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batch), desc="sweep", unit="cell", file=sys.stderr, disable=not progress)
        try:
            for cell in batch:
                bar.set_postfix_str(cell.describe(), refresh=True)
                if cell.work_key in by_work:  # the same work under another name: copy, do not redo
                    results_file.append(_reused(cell, by_work[cell.work_key]))
                    outcome.computed.append(cell.id)
                    bar.update(1)
                    continue
                try:
                    record = runner.run(cell)
                except Exception as exc:
                    if not keep_going:
                        raise
                    log.error("cell %s (%s) failed: %s: %s; continuing (--keep-going)", cell.id, cell.describe(),
                              type(exc).__name__, exc)
                    outcome.failed.append(cell.id)
                else:
                    results_file.append(record)
                    by_work[cell.work_key] = record
                    outcome.computed.append(cell.id)
                bar.update(1)
        finally:
            bar.close()
        outcome.remaining = len(todo) - len(outcome.computed)
        return outcome
    finally:
        results_file.close()


class _Runner:
    """Holds what cells share: the tokenizer, calibration windows per seed, the pass-1 cache."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.device = _resolve_device(spec.device)
        self.calibrations: dict[Calibration, tuple[Any, dict]] = {}
        self.pass1 = LRUCache(spec.pass1_cache_entries)

    def run(self, cell: Cell) -> dict[str, Any]:
        from .report import peak_rss_window

        _reset_cuda_peak(self.device)
        load_before, cpu_before = _load_average(), _cpu_seconds()
        start = time.perf_counter()
        with peak_rss_window() as cell_peak:  # per-cell peak RSS; the stages' peaks are windows inside it
            record = self._dense(cell) if cell.kind == "dense" else self._pruned(cell)
        record["wall_s"] = time.perf_counter() - start
        record["machine"] = _machine(load_before, _load_average(), _cpu_seconds() - cpu_before, record["wall_s"])
        record["peak_rss_cell_gib"] = cell_peak[0]
        record["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        gc.collect()
        return record

    def _load(self):
        from .sources import load_model

        return load_model(self.spec.model, dtype=self.spec.dtype, device="cpu",
                          trust_remote_code=self.spec.trust_remote_code)

    def _base_record(self, cell: Cell) -> dict[str, Any]:
        return {"id": cell.id, "kind": cell.kind, "name": cell.name, "label": cell.allocator_label,
                "varied": dict(cell.varied), "config": cell.config(), "eval_config": dict(cell.eval),
                "device": self.device, "compute_dtype": cell.compute}

    def _dense(self, cell: Cell) -> dict[str, Any]:
        from .report import StageTimer, peak_memory, versions

        timer = StageTimer()
        with timer("load"):
            model, tokenizer = self._load()
        with timer("eval"):
            results = self._evaluate(model, tokenizer, cell)
        record = self._base_record(cell)
        record.update(eval=results, achieved_sparsity=0.0, timings_s=dict(timer.timings),
                      eval_s=timer.timings["eval"], stage_peak_rss_gib=dict(timer.peak_rss_gib),
                      peak_memory=peak_memory(_torch_device(self.device)), versions=versions())
        log.info("dense: %s", _headline(results))
        return record

    def _pruned(self, cell: Cell) -> dict[str, Any]:
        from .report import StageTimer

        timer = StageTimer()
        with timer("load"):
            model, tokenizer = self._load()
        with timer("calibration"):
            calibration, info = self._calibration(cell.calibration, model, tokenizer)
        config = dataclasses.replace(cell.prune, device=self.device)
        hits = self.pass1.hits
        report = prune_(model, calibration, config, calibration_info=info, pass1_cache=self.pass1)
        with timer("eval"):
            results = self._evaluate(model, tokenizer, cell)
        eval_s = timer.timings["eval"]
        plots = self._plots(cell, report)
        allocation = report.allocation
        record = self._base_record(cell)
        record.update(
            prune_config=report.config, calibration=report.calibration, eval=results,
            achieved_sparsity=report.achieved_sparsity, allocated_sparsity=report.allocated_sparsity,
            allocation={"units": allocation.get("units"), "sparsity": allocation.get("sparsity"),
                        "mean_sparsity": allocation.get("mean_sparsity"), "nm": allocation.get("nm"),
                        **_block_rm(allocation), **_search_records(allocation)},
            pass1_reused=self.pass1.hits > hits,
            timings_s=_around(timer.timings, report.timings_s), eval_s=eval_s,
            stage_peak_rss_gib=_around(timer.peak_rss_gib, report.stage_peak_rss_gib),
            peak_memory=report.peak_memory, versions=report.versions, plots=plots,
        )
        log.info("%s: achieved sparsity %.4f, %s (prune %.1f s, eval %.1f s)", cell.describe(),
                 report.achieved_sparsity, _headline(results), sum(report.timings_s.values()), eval_s)
        return record

    def _calibration(self, calib: Calibration, model, tokenizer):
        """Calibration windows, sampled once per (corpus, nsamples, seqlen, seed) in this run."""
        from .cli import sample_calibration_from

        if calib not in self.calibrations:
            limit = getattr(model.config, "max_position_embeddings", None)
            if limit and calib.seqlen > limit:
                raise SweepConfigError(f"calibration seqlen {calib.seqlen} is longer than the model's context "
                                       f"({limit} positions)")
            ids, info = sample_calibration_from(calib.corpus, tokenizer, calib.nsamples, calib.seqlen, calib.seed)
            vocab = model.get_input_embeddings().weight.shape[0]
            if int(ids.max()) >= vocab:
                raise SweepConfigError(f"the tokenizer produced token id {int(ids.max())} but the model has only "
                                       f"{vocab} embeddings")
            self.calibrations[calib] = (ids, info)
        return self.calibrations[calib]

    def _evaluate(self, model, tokenizer, cell: Cell) -> dict:
        from .eval import EvalConfig, evaluate

        model.to(self.device)
        return evaluate(model, tokenizer, EvalConfig(**cell.eval, compute_dtype=cell.compute))

    def _plots(self, cell: Cell, report) -> list[str]:
        """The report's figures under plots_dir/<cell id>/ (written to a temporary folder, then renamed)."""
        if self.spec.plots_dir is None:
            return []
        from .plots import write_plots

        final = Path(self.spec.plots_dir) / cell.id
        tmp = final.with_name(f".{cell.id}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        names = [p.name for p in write_plots(report, tmp) if p is not None]
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return [str(final / n) for n in names]


def _around(sweep_stages: Mapping[str, float], prune_stages: Mapping[str, float]) -> dict[str, float]:
    """A cell's stages in the order they ran: the sweep's load and calibration, prune_'s, the eval."""
    return {"load": sweep_stages["load"], "calibration": sweep_stages["calibration"], **prune_stages,
            "eval": sweep_stages["eval"]}


def _headline(results: Mapping[str, Any]) -> str:
    parts = [f"token-ppl {k} {v['ppl']:.4f}" for k, v in results.get("token_ppl", {}).items()]
    if results.get("tasks_mean"):
        parts.append(f"zero-shot mean {results['tasks_mean']['value']:.4f}")
    return ", ".join(parts) or "evaluated"


def _block_rm(allocation: Mapping[str, Any]) -> dict[str, Any]:
    """The RM matrix between blocks, rounded to 4 decimals (30 blocks: ~6 kB of JSON), so the
    report can draw a cell's heat map from the results file alone; linear-level RM is not kept."""
    rm = (allocation.get("diagnostics") or {}).get("block_rm")
    return {"block_rm": [[round(float(x), 4) for x in row] for row in rm]} if rm else {}


def _search_records(allocation: Mapping[str, Any]) -> dict[str, Any]:
    """What a cell's allocator searched, as its report holds it: the strength search's candidates,
    held-out losses and choice; the searched allocation's warm starts, trace, confirmation, final
    held-out figures and time per phase. The evidence tables are drawn from these."""
    from .strength import RECORD

    diagnostics = allocation.get("diagnostics") or {}
    return {key: diagnostics[key] for key in (RECORD, "search") if key in diagnostics}


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine(load_start: float | None, load_end: float | None, cpu_s: float, wall_s: float) -> dict[str, Any]:
    """How busy the machine was while a cell ran, so timings taken beside other work can be told
    apart: the 1-minute load average at the start and end (it counts this process's own threads),
    the CPU seconds the cell used, and ``busy``: a load above the core count plus one half."""
    import torch

    cores = os.cpu_count() or 1
    loads = [x for x in (load_start, load_end) if x is not None]
    return {"cores": cores, "threads": torch.get_num_threads(), "load_1m_start": load_start, "load_1m_end": load_end,
            "cpu_s": round(cpu_s, 1), "cpu_per_wall": round(cpu_s / wall_s, 2) if wall_s > 0 else None,
            "busy": bool(loads) and max(loads) > cores + 0.5}


def _resolve_device(requested: str | None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_device(name: str):
    import torch

    return torch.device(name)


def _reset_cuda_peak(device: str) -> None:
    """Per-cell peaks on CUDA (the RSS peak is a window around the cell)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()
