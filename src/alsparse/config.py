"""Frozen configuration objects, validated on construction."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Pattern:
    """Sparsity pattern: unstructured (n=m=0) or N:M = n zeros in every m consecutive inputs."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> Optional[float]:
        return self.n / self.m if self.is_nm else None

    @classmethod
    def parse(cls, text: "str | Pattern") -> "Pattern":
        if isinstance(text, Pattern):
            return text
        if text in ("unstructured", "", None):
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"pattern {text!r} is malformed; use 'unstructured' or 'N:M' such as '2:4' or '4:8'")
        n, m = int(match.group(1)), int(match.group(2))
        if m < 2 or not 0 < n < m:
            raise ValueError(f"pattern {text!r}: N:M needs 0 < N < M and M >= 2 (e.g. 2:4, 4:8)")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


@dataclass(frozen=True)
class ALSOptions:
    """Every ALS ambiguity is an option; defaults follow ../shared/ALS_SPEC.md."""

    level: str = "block"  # block | component | joint
    feature: str = "auto"  # auto: block input at block level, linear output at component level
    normalize: str = "center"  # center | standardize | none
    expression: str = "modified"  # modified: exp(-rho/mu) ; original: exp(-rho)
    # graded: the size-weighted QP over min-max normalised importance, its strength (the sparsity
    # spread) chosen on held-out calibration windows; lp: the literal Eq. 5 (a two-valued vertex);
    # qp: the DSA-style QP on raw c (uniform in effect: c spans a tiny range). docs/ALLOCATION.md.
    solver: str = "graded"  # graded | lp | qp
    lp_method: str = "highs"  # highs | closed_form
    delta: float = 0.2
    bounds: str = "relative"  # relative | absolute
    s_min: Optional[float] = None  # absolute bounds
    s_max: Optional[float] = None
    granularity: Optional[float] = None  # e.g. 0.005 (paper); None = no rounding
    qp_lambda: float = 8.0
    strength: Optional[float] = None  # graded solver's spread; None: chosen among strength_grid
    strength_grid: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)  # 0.4 = 2 x delta: the box
    tokens: Optional[int] = 4096  # m tokens kept per unit for RM; None = exact (all tokens)
    # pass 1 runs the first `windows` calibration windows only (None: all). The paper uses 16
    # sequences (an appendix: 2; "accuracy barely moves between 2 and 256"); 8 keeps the ALS
    # overhead (pass 1 + LP) under a quarter of Wanda's two passes over 32 windows.
    windows: Optional[int] = 8

    def feature_for(self, level: str) -> str:
        """The feature a unit of ``level`` ("block" or "linear") is summarised by."""
        if self.feature != "auto":
            return self.feature
        return "input" if level == "block" else "output"

    def __post_init__(self) -> None:
        _choice("als level", self.level, ("block", "component", "joint"))
        _choice("als feature", self.feature, ("auto", "input", "output"))
        _choice("als normalize", self.normalize, ("center", "standardize", "none"))
        _choice("als expression", self.expression, ("modified", "original"))
        _choice("als solver", self.solver, ("graded", "lp", "qp"))
        object.__setattr__(self, "strength_grid", tuple(float(t) for t in self.strength_grid))
        if self.strength is not None and not 0 <= self.strength < 1:
            raise ValueError(f"als strength must be in [0, 1), got {self.strength}")
        if not self.strength_grid or any(not 0 <= t < 1 for t in self.strength_grid):
            raise ValueError(f"als strength_grid must be non-empty values in [0, 1), got {self.strength_grid}")
        _choice("als lp_method", self.lp_method, ("highs", "closed_form"))
        _choice("als bounds", self.bounds, ("relative", "absolute"))
        if not 0 <= self.delta < 1:
            raise ValueError(f"als delta must be in [0, 1), got {self.delta}")
        if self.granularity is not None and not 0 < self.granularity < 0.5:
            raise ValueError(f"als granularity must be in (0, 0.5), got {self.granularity}")
        if self.bounds == "absolute" and (self.s_min is None or self.s_max is None):
            raise ValueError("als bounds='absolute' needs s_min and s_max")
        if self.windows is not None and self.windows < 1:
            raise ValueError(f"als windows must be >= 1 or None (all), got {self.windows}")
        if self.tokens is not None and self.tokens < 2:
            raise ValueError(f"als tokens must be >= 2 or None (exact), got {self.tokens}")


@dataclass(frozen=True)
class BaselineOptions:
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    dlp_alpha: float = 0.15
    dlp_score_means: str = "unimportance"  # the spec's / reference code's sign; "importance" flips it
    alpha_eps: float = 0.3
    atp_beta: Optional[float] = None  # None: chosen by held-out calibration loss
    atp_grid: int = 5


SEARCH_FINALS = ("auto", "sequential", "assembled")
SEARCH_DATABASES = ("auto", "dense", "sequential")  # the inputs each block's levels are pruned from
MASK_PRUNERS = ("magnitude", "wanda")  # their pruned weight is the dense weight with a mask applied


def search_final(final: str, method: str) -> str:
    """How the searched allocation's final model is made: ``final`` itself, or for ``auto`` assembled
    for the mask pruners and sequential for the others (SparseGPT)."""
    if final != "auto":
        return final
    return "assembled" if method in MASK_PRUNERS else "sequential"


def search_database(database: str, method: str) -> str:
    """The inputs the searched allocation's level database is pruned from: ``database`` itself, or for
    ``auto`` the dense model's for the mask pruners and the uniformly pruned model's (sequential) for
    the others (SparseGPT, whose weight update is fitted to the inputs it is given)."""
    if database != "auto":
        return database
    return "dense" if method in MASK_PRUNERS else "sequential"


@dataclass(frozen=True)
class SearchOptions:
    """The searched allocation (``allocation="search"``, alsparse.search): an evolution over per-block
    sparsity levels ``target + j * step`` within ``target +- span``, scored on the held-out quarter
    of the calibration windows. ``budget``: window forwards the evolution may spend (None: 12 per
    calibration window). ``stages``: (survivors, windows, tokens per window) per selection stage;
    the last keeps one child, scored on the first windows of the held-out set (tokens None: the
    whole window). ``final``: how the final model is made from the found allocation: pruned again
    block after block (``sequential``: each block's statistics from the already pruned blocks'
    outputs, all calibration windows), assembled from the level database (``assembled``: the
    model the search scored, no further pass), or ``auto`` (default): assembled for the mask
    pruners (magnitude, Wanda), sequential for SparseGPT, whose weight update gains from the pruned
    blocks' inputs (the evidence on held-out calibration windows: docs/ALLOCATION.md).
    ``database``: the inputs each block's levels are pruned from: the dense model's (``dense``, as
    EvoPress), those of the model pruned uniformly at the target block by block (``sequential``: the
    statistics a sequential prune near the target sees; pass 1 then runs apart on the dense stream),
    or ``auto`` (default): dense for the mask pruners, sequential for SparseGPT (the evidence on
    held-out calibration windows: docs/ALLOCATION.md, item 1)."""

    budget: Optional[int] = None
    step: float = 0.05
    span: float = 0.2
    offspring: int = 16
    stages: tuple[tuple[int, int, Optional[int]], ...] = ((4, 1, 256), (1, 2, None))
    max_flips: int = 3
    fitness: str = "loss"  # loss: next-token NLL | kl: KL(dense || candidate) over the vocabulary
    warm_start: tuple[str, ...] = ("uniform", "als", "owl", "atp")
    final: str = "auto"  # auto | sequential | assembled
    database: str = "auto"  # auto | dense | sequential

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple((int(a), int(b), None if c is None else int(c)) for a, b, c in self.stages))
        object.__setattr__(self, "warm_start", tuple(self.warm_start))
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"search budget must be >= 0 window forwards, got {self.budget}")
        if not 0 < self.span < 1 or not 0 < self.step <= self.span:
            raise ValueError(f"search step and span need 0 < step <= span < 1, got step {self.step}, span {self.span}")
        if self.offspring < 1 or self.max_flips < 1:
            raise ValueError("search offspring and max_flips must be >= 1")
        _choice("search fitness", self.fitness, ("loss", "kl"))
        _choice("search final", self.final, SEARCH_FINALS)
        _choice("search database", self.database, SEARCH_DATABASES)
        for name in self.warm_start:
            _choice("search warm start", name, ("uniform", "als", "owl", "atp"))
        if "uniform" not in self.warm_start:
            raise ValueError("search warm_start must include 'uniform' (so the search never loses to it)")


@dataclass(frozen=True)
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    allocation_file: Optional[str] = None  # JSON/YAML mapping for allocation="file"
    seed: int = 0
    device: Optional[str] = None  # None: the device the model is on
    batch_size: int = 1  # calibration windows per micro-batch
    offload: str = "device"  # where calibration activations live: device | cpu
    als: ALSOptions = field(default_factory=ALSOptions)
    baselines: BaselineOptions = field(default_factory=BaselineOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    sparsegpt_blocksize: int = 128
    sparsegpt_damp: float = 0.01
    # how a strength search (ATP's beta, graded ALS's strength) scores its candidates on the held-out
    # quarter of the calibration windows: oneshot prunes every block from the dense model's inputs,
    # all candidates in one stream (cheap); sequential prunes a model copy per candidate (exact).
    strength_search: str = "oneshot"
    # the dtype the blocks' forwards run in (alsparse.compute): auto = bf16 where the device has fast
    # bf16 (CUDA; a CPU with AMX-BF16 / AVX-512-BF16), else the weights' dtype. Statistics, SparseGPT's
    # updates and the weights themselves stay in their own precision.
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        from .allocate import ALLOCATORS  # registry lookups validate names
        from .pruning import PRUNERS

        check_compute_dtype(self.compute_dtype)

        PRUNERS.get(self.method)
        ALLOCATORS.get(self.allocation)
        pattern = Pattern.parse(self.pattern)
        object.__setattr__(self, "pattern", str(pattern))
        check_sparsity(self.sparsity)
        if pattern.is_nm and abs(pattern.sparsity - self.sparsity) > 1e-9:
            object.__setattr__(self, "sparsity", pattern.sparsity)
        if self.allocation == "file" and not self.allocation_file:
            raise ValueError("allocation='file' needs allocation_file (a JSON/YAML mapping of unit -> sparsity)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        _choice("offload", self.offload, ("device", "cpu"))
        _choice("strength_search", self.strength_search, ("oneshot", "sequential"))
        if self.sparsegpt_blocksize < 1 or not 0 < self.sparsegpt_damp < 1:
            raise ValueError("sparsegpt_blocksize must be >= 1 and sparsegpt_damp in (0, 1)")

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists), so a dict read back from a file compares equal."""
        import json

        return json.loads(json.dumps(asdict(self)))


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_compute_dtype(value: Any) -> None:
    """One of COMPUTE_DTYPES (alsparse.compute says what each means)."""
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {value!r} is not valid; choose one of: {', '.join(COMPUTE_DTYPES)}")


def check_sparsity(value: Any) -> None:
    """A target sparsity is a fraction in [0, 1); 50 is taken for a percentage and the hint says so."""
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        hint = f" (did you mean {value / 100:g}?)" if isinstance(value, (int, float)) and 1 < value < 100 else ""
        raise ValueError(f"sparsity must be in [0, 1), got {value!r}{hint}")


def _choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not valid; choose one of: {', '.join(allowed)}")
