"""Command line: parses, calls the API, prints. The only module that prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import sweep_cli
from .config import SEARCH_DATABASES
from .fsmodes import write_json_atomic
from .locks import InUseError

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alsparse", description="Adaptive Layer Sparsity pruning for LLMs")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="prune a model and save it with a report")
    pr.add_argument("model", help="local HF directory, hub id, .gguf file, or 'smollm2-135m' (embedded default)")
    pr.add_argument("--sparsity", type=float, default=0.5, help="target sparsity in [0, 1) (default 0.5)")
    pr.add_argument("--method", default="wanda", help="pruner: see 'alsparse ls' (default wanda)")
    pr.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4, 4:8")
    pr.add_argument("--allocation", default="uniform", help="allocator: see 'alsparse ls' (default uniform)")
    pr.add_argument("--allocation-file", help="JSON/YAML per-block mapping, with --allocation file")
    pr.add_argument("--calib", default="wikitext2", help="calibration corpus name or a .txt file (default: wikitext2 validation)")
    pr.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32; papers use 128)")
    pr.add_argument("--seq-len", dest="seqlen", type=int, default=1024, metavar="N",
                    help="tokens per calibration window (default 1024; papers use 2048)")
    pr.add_argument("--seqlen", dest="seqlen", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name
    pr.add_argument("--seed", type=int, default=0,
                    help="seed of the calibration sample and the RM token subset (default 0); same seed, same masks")
    pr.add_argument("--batch-size", type=int, default=None,
                    help="calibration windows per micro-batch (default 4; 1 with --from-disk, the least memory: "
                         "on SmolLM2 at 32 x 1024, 0.67-0.72 against 0.83 GiB, and no slower on CPU)")
    pr.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    pr.add_argument("--dtype", default="float32", help="weights dtype: float32 | bfloat16 | float16 (default float32)")
    pr.add_argument("--offload", default="device", help="where calibration activations live: device | cpu")
    _add_compute_args(pr)
    pr.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out directory (only once the new one is complete)")
    pr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from its per-block checkpoints (OUT.alsparse-ckpt)")
    pr.add_argument("--from-disk", action="store_true",
                    help="keep the blocks on disk, read each when needed and write it out once pruned: memory about "
                         "one block whatever the model size (needs a local safetensors directory)")
    pr.add_argument("--no-checkpoint", action="store_true",
                    help="do not write per-block checkpoints (saves disk: they take the pruned model's size)")
    pr.add_argument("--trust-remote-code", action="store_true",
                    help="allow a model directory's own Python code to run (off: such models are refused)")
    pr.add_argument("--eval", action="store_true", help="evaluate dense and pruned models, side by side")
    _add_als_args(pr)
    _add_search_args(pr)
    _add_eval_args(pr, prefix="eval-")

    ev = sub.add_parser("eval", help="evaluate a model: perplexity (named protocol) and zero-shot accuracy")
    ev.add_argument("model", help="local HF directory, hub id, .gguf file, or 'smollm2-135m'")
    ev.add_argument("--dtype", default="float32", help="weights dtype: float32 | bfloat16 | float16 (default float32)")
    ev.add_argument("--device", default=None)
    _add_compute_args(ev)
    ev.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    ev.add_argument("--harness", default="alsparse", choices=("alsparse", "lm-eval"),
                    help="lm-eval: also run the --tasks (and --word-ppl) through lm-evaluation-harness, offline, with "
                         "its official task definitions over the local data, and print its table beside ours "
                         "(needs pip install 'alsparse[eval]')")
    ev.add_argument("--stream", action="store_true",
                    help="keep the model on CPU and onload one block at a time to --device (models larger than it)")
    ev.add_argument("--from-disk", action="store_true",
                    help="read each block from the safetensors files only for its forward (implies --stream)")
    ev.add_argument("--trust-remote-code", action="store_true",
                    help="allow a model directory's own Python code to run (off: such models are refused)")
    _add_eval_args(ev, prefix="")

    sub.add_parser("ls", help="list registered pruners, allocators, corpora and tasks")
    sweep_cli.add_parsers(sub)
    return p


def _add_compute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compute-dtype", default="auto",
                   help="dtype the forwards run in, weights kept as --dtype: auto (default: bfloat16 on a CUDA GPU or "
                        "a CPU with AMX-BF16 / AVX-512-BF16, else the weights' dtype) | float32 | bfloat16 | float16")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: torch's, all cores; torchrun gives each process 1). The "
                        "same count gives the same masks bit for bit; another count may round sums differently")


def _apply_threads(args) -> None:
    if args.threads is None:
        return
    import torch

    torch.set_num_threads(args.threads)


def _add_eval_args(p: argparse.ArgumentParser, prefix: str) -> None:
    g = p.add_argument_group("evaluation" + (" (with --eval)" if prefix else ""))
    g.add_argument(f"--{prefix}ppl", default="wikitext2", help="comma-separated corpora for token-ppl ('' for none)")
    g.add_argument(f"--{prefix}tasks", default="", help="comma-separated zero-shot tasks, e.g. piqa,arc_easy")
    g.add_argument(f"--{prefix}limit", type=int, default=None, help="first N perplexity windows / documents")
    g.add_argument(f"--{prefix}task-limit", type=int, default=None, help="first N items of each task")
    g.add_argument(f"--{prefix}seq-len", type=int, default=None,
                   help=f"perplexity window in tokens (default min(context, 2048), the papers'; the docs' figures "
                        f"use --{prefix}seq-len 1024 --{prefix}limit 40)")
    g.add_argument(f"--{prefix}batch-size", type=int, default=8, help="zero-shot batch size")
    g.add_argument(f"--{prefix}word-ppl", action="store_true", help="also lm-eval's document-level word perplexity")


def _eval_config(args, prefix: str):
    from .eval import EvalConfig

    def get(name):
        return getattr(args, prefix + name)

    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    return EvalConfig(
        ppl=split(get("ppl")),
        tasks=split(get("tasks")),
        seq_len=get("seq_len"),
        limit=get("limit"),
        task_limit=get("task_limit"),
        batch_size=get("batch_size"),
        word_ppl=get("word_ppl"),
        compute_dtype=args.compute_dtype,
    )


def _add_als_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ALS options (with --allocation als)")
    g.add_argument("--als-level", default="block", help="block | component | joint")
    g.add_argument("--als-delta", type=float, default=0.2, help="relative bound S +- delta (default 0.2)")
    g.add_argument("--als-bounds", default="relative", help="relative (S +- delta) | absolute (--als-smin/--als-smax)")
    g.add_argument("--als-smin", type=float, default=None, help="absolute lower bound on a unit's sparsity")
    g.add_argument("--als-smax", type=float, default=None, help="absolute upper bound on a unit's sparsity")
    g.add_argument("--als-granularity", type=float, default=None, help="round ratios to multiples of g (paper 0.005)")
    g.add_argument("--als-solver", default="graded",
                   help="graded (default: sparsity linear in importance, its strength chosen on held-out calibration) "
                        "| lp (the literal Eq. 5: every unit at S - delta or S + delta) | qp (DSA-style, raw c)")
    g.add_argument("--als-strength", type=float, default=None,
                   help="graded solver's sparsity spread between the most and least important unit "
                        "(default: chosen among --als-strength-grid by held-out calibration loss; 0 = uniform)")
    g.add_argument("--als-strength-grid", default="0,0.05,0.1,0.15,0.2,0.3,0.4",
                   help="candidate strengths the search scores (comma-separated; 0 is always included)")
    g.add_argument("--als-feature", default="auto", help="auto | input | output (auto: block input, linear output)")
    g.add_argument("--als-normalize", default="center", help="center | standardize | none")
    g.add_argument("--als-expression", default="modified", help="modified | original")
    g.add_argument("--als-tokens", type=int, default=4096, help="tokens kept per unit for RM (0 = all, exact)")
    g.add_argument("--als-windows", type=int, default=8, help="calibration windows pass 1 runs (0 = all; paper 16)")
    b = p.add_argument_group("baseline allocator options")
    b.add_argument("--owl-lambda", type=float, default=0.08,
                   help="OWL: the sparsity spread is 2 x lambda around the target (default 0.08)")
    b.add_argument("--owl-m", type=float, default=5.0,
                   help="OWL: a Wanda score above M x its block's mean counts as an outlier (default 5)")
    b.add_argument("--dlp-alpha", type=float, default=0.15,
                   help="DLP: densities span 2 x alpha around 1 - target (default 0.15)")
    b.add_argument("--alpha-eps", type=float, default=0.3,
                   help="AlphaPruning: sparsities span [S (1 - eps), S (1 + eps)] before rescaling (default 0.3)")
    b.add_argument("--atp-beta", type=float, default=None, help="default: chosen by held-out calibration loss")
    b.add_argument("--strength-search", default="oneshot",
                   help="how ATP's beta / graded ALS's strength candidates are scored on the held-out quarter of the "
                        "calibration: oneshot (default: every block pruned from the dense inputs, all candidates in "
                        "one pass) | sequential (a full prune per candidate; slower)")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("searched allocation (with --allocation search)")
    g.add_argument("--search-budget", type=int, default=None,
                   help="window forwards the evolution may spend on the held-out calibration windows "
                        "(default: 12 per calibration window)")
    g.add_argument("--search-fitness", default="loss", choices=("loss", "kl"),
                   help="loss: next-token NLL (default) | kl: KL divergence from the dense model")
    g.add_argument("--search-step", type=float, default=0.05,
                   help="sparsity between two levels (default 0.05; with --pattern N:M the levels are (N+j):M)")
    g.add_argument("--search-span", type=float, default=0.2,
                   help="levels stay within target +- span (default 0.2; N:M: at least one step, 1/M)")
    g.add_argument("--search-offspring", type=int, default=16, help="children per generation (default 16)")
    g.add_argument("--search-final", default="auto", choices=("auto", "sequential", "assembled"),
                   help="the final model: auto (default): assembled for magnitude and Wanda, sequential for "
                        "SparseGPT | sequential: pruned again block after block with the found ratios | "
                        "assembled: from the level database, i.e. the model the search scored (no further pass)")
    g.add_argument("--search-database", default="auto", choices=SEARCH_DATABASES,
                   help="the inputs each block's levels are pruned from: auto (default): dense for magnitude "
                        "and Wanda, sequential for SparseGPT | dense: the dense model's | sequential: the "
                        "model's pruned uniformly at the target block by block")


def _search_options(args):
    from .config import SearchOptions

    return SearchOptions(budget=args.search_budget, fitness=args.search_fitness, step=args.search_step,
                         span=args.search_span, offspring=args.search_offspring, final=args.search_final,
                         database=args.search_database)


def _baseline_options(args):
    from .config import BaselineOptions

    return BaselineOptions(
        owl_lambda=args.owl_lambda, owl_m=args.owl_m, dlp_alpha=args.dlp_alpha, alpha_eps=args.alpha_eps,
        atp_beta=args.atp_beta,
    )


def _als_options(args):
    from .config import ALSOptions

    return ALSOptions(
        level=args.als_level,
        delta=args.als_delta,
        bounds=args.als_bounds,
        s_min=args.als_smin,
        s_max=args.als_smax,
        granularity=args.als_granularity,
        solver=args.als_solver,
        feature=args.als_feature,
        normalize=args.als_normalize,
        expression=args.als_expression,
        tokens=args.als_tokens or None,
        windows=args.als_windows or None,
        strength=args.als_strength,
        strength_grid=_floats(args.als_strength_grid, "--als-strength-grid"),
    )


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers such as 0,0.05,0.1; got {text!r}") from None


def _cmd_ls(args) -> int:
    from .allocate import ALLOCATORS
    from .data.tasks import task_names
    from .data.text import CORPORA
    from .pruning import PRUNERS

    print("pruners:")
    for name in PRUNERS:
        print(f"  {name:12s} {PRUNERS.get(name).description}")
    print("allocators:")
    for name in ALLOCATORS:
        print(f"  {name:12s} {ALLOCATORS.get(name).description}")
    print("corpora:", ", ".join(CORPORA.names()), "(or a path to a .txt file)")
    print("tasks:", ", ".join(task_names()))
    return 0


def _cmd_eval(args) -> int:
    import torch

    from .eval import evaluate, format_results
    from .models import streamed
    from .sources import load_model

    _check_compute_args(args)
    cfg = _eval_config(args, "")
    _check_harness(args, cfg)
    _apply_threads(args)
    device = _resolve_device(args.device)
    stream = args.stream or args.from_disk
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu" if stream else device,
                                  trust_remote_code=args.trust_remote_code, from_disk=args.from_disk)
    if stream:
        with streamed(model, torch.device(device)):
            results = evaluate(model, tokenizer, cfg)
    else:
        results = evaluate(model, tokenizer, cfg)
    results["model"] = args.model
    print(format_results(results))
    if args.harness == "lm-eval":
        results["lm_eval"] = _lm_eval_beside(model, tokenizer, cfg, device, stream)
    if args.json_out:
        write_json_atomic(Path(args.json_out), results)
    return 0


def _check_harness(args, cfg) -> None:
    if args.harness != "lm-eval":
        return
    from .eval.lm_eval_adapter import lm_eval_available
    from .eval.lm_eval_tasks import LOCAL_TASKS

    missing = [t for t in cfg.tasks if t not in LOCAL_TASKS]
    if missing:
        raise UsageError(f"--harness lm-eval: no lm-eval definition here for {', '.join(missing)} (lm-eval's copa is "
                         f"SuperGLUE's, another prompt); tasks it runs: {', '.join(t for t in LOCAL_TASKS if t != 'wikitext')}")
    if not cfg.tasks and not cfg.word_ppl:
        raise UsageError("--harness lm-eval runs --tasks and --word-ppl; name at least one")
    if not lm_eval_available():
        raise UsageError("--harness lm-eval needs the lm-eval package: pip install 'alsparse[eval]'")


def _lm_eval_beside(model, tokenizer, cfg, device, stream) -> dict:
    """lm-eval's numbers for the same model, tasks and limits; its own table printed after ours."""
    import contextlib

    import torch

    from .eval.forward import model_max_length
    from .eval.lm_eval_adapter import evaluate_with_lm_eval
    from .models import streamed

    max_length = cfg.seq_len or model_max_length(model)
    runs = []
    if cfg.tasks:
        runs.append((list(cfg.tasks), cfg.task_limit))
    if cfg.word_ppl:
        runs.append((["wikitext"], cfg.limit))
    out: dict = {}
    for tasks, limit in runs:
        with streamed(model, torch.device(device)) if stream else contextlib.nullcontext():
            result = evaluate_with_lm_eval(model, tokenizer, tasks, limit, cfg.batch_size, max_length,
                                           compute_dtype=cfg.compute_dtype)
        print(f"\nlm-eval {result['version']} (official task definitions, local data; task names prefixed "
              f"alsparse_):\n{result['table']}")
        out.update(result["results"])
        out["version"] = result["version"]
    return out


def _join_process_group(device: str, args) -> tuple[str, bool]:
    """Under torchrun: join the process group; other ranks stay quiet. Returns (device, is rank 0)."""
    from . import distributed

    if not distributed.launched():
        return device, True
    if args.eval:
        raise UsageError("--eval is not available with several processes; evaluate the saved model with "
                         "'alsparse eval OUT'")
    device = distributed.init_from_env(device)
    if not distributed.is_main():  # progress bars and info logs come from rank 0 only
        logging.getLogger("alsparse").setLevel(logging.WARNING)
    return device, distributed.is_main()


def _leave_process_group() -> None:
    from . import distributed

    distributed.shutdown()


def checkpoint_dir(out: Path) -> Path:
    """Where a prune writing to ``out`` keeps its per-block checkpoints."""
    return out.with_name(out.name + ".alsparse-ckpt")


def check_writable(out: Path) -> None:
    """Fail before hours of work, not after: the output's nearest existing ancestor must be a
    directory we can create files in."""
    import os
    import tempfile

    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot write {out}: {ancestor} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".alsparse-write-test-", dir=ancestor)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {ancestor} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def _check_compute_args(args) -> None:
    from .config import check_compute_dtype

    check_compute_dtype(args.compute_dtype)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")


def _resolve_device(requested: Optional[str]) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cmd_prune(args) -> int:
    import os

    from .locks import exclusive, lock_path_for

    from .config import Pattern, check_sparsity

    # the mistakes that need no model are reported before torch and transformers load
    check_sparsity(args.sparsity)
    Pattern.parse(args.pattern)
    _check_compute_args(args)
    if args.nsamples < 1 or args.seqlen < 2:
        raise UsageError(f"--nsamples must be >= 1 and --seq-len >= 2, got {args.nsamples} and {args.seqlen}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"output directory {out} exists; pass --overwrite to replace it")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        # data-parallel (distributed.launched()): rank 0 alone writes, and locks
        return _prune_locked(args, out)
    check_writable(out)
    # held from before the model loads until the output is in place: a second run on the same --out
    # (or its checkpoints) fails in seconds instead of writing over this one
    with exclusive(lock_path_for(out), f"output directory {out}"):
        return _prune_locked(args, out)


def _prune_locked(args, out: Path) -> int:
    from .api import prune_
    from .checkpoint import MANIFEST, BlockCheckpoints
    from .config import PruneConfig
    from .io import save
    from .sources import load_model

    if out.exists() and not args.overwrite:
        raise UsageError(f"output directory {out} exists; pass --overwrite to replace it")
    ckpt = None if args.no_checkpoint else BlockCheckpoints(checkpoint_dir(out))
    if ckpt is not None and (ckpt.dir / MANIFEST).is_file() and not args.resume:
        raise UsageError(f"checkpoints of an interrupted run are in {ckpt.dir}; pass --resume to continue it, "
                         f"or delete that directory to start over")
    if args.resume and ckpt is None:
        raise UsageError("--resume needs the checkpoints that --no-checkpoint turns off")
    if args.from_disk and ckpt is None:
        raise UsageError("--from-disk writes each pruned block to the checkpoints; it cannot be used with "
                         "--no-checkpoint")
    device = _resolve_device(args.device)
    device, main_process = _join_process_group(device, args)
    config = PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        allocation=args.allocation,
        allocation_file=args.allocation_file,
        seed=args.seed,
        device=device,
        batch_size=(1 if args.from_disk else 4) if args.batch_size is None else args.batch_size,
        offload=args.offload,
        als=_als_options(args),
        baselines=_baseline_options(args),
        search=_search_options(args),
        strength_search=args.strength_search,
        compute_dtype=args.compute_dtype,
    )
    _apply_threads(args)
    logging.getLogger("alsparse").info("loading %s", args.model)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu", trust_remote_code=args.trust_remote_code,
                                  from_disk=args.from_disk)
    _check_seqlen(model, args.seqlen)
    calibration, calib_info = sample_calibration_from(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed)
    _check_vocab(model, calibration)
    print(f"calibration: {calib_info['source']}, {args.nsamples} x {args.seqlen} tokens, seed {args.seed}", file=sys.stderr)
    eval_cfg = _eval_config(args, "eval_") if args.eval else None
    dense = _evaluate_on(model, tokenizer, eval_cfg, device, "dense") if eval_cfg else None
    report = prune_(model, calibration, config, calibration_info=calib_info, checkpoint=ckpt, resume=args.resume)
    if report.resumed_from_block is not None:
        print(f"resumed: blocks before {report.resumed_from_block} came from the checkpoints in {ckpt.dir}",
              file=sys.stderr)
    summary = {"out": str(out), **report.summary()}
    extra = {}
    if eval_cfg and not args.from_disk:
        pruned = _evaluate_on(model, tokenizer, eval_cfg, device, "pruned")
        summary["eval"] = {"dense": dense, "pruned": pruned}
        extra["alsparse_eval.json"] = json.dumps(summary["eval"], indent=2, default=str).encode()
    _leave_process_group()  # every collective is done
    if not main_process:  # data-parallel: rank 0 writes the model and prints the summary
        return 0
    save(model, tokenizer, report, out, overwrite=args.overwrite, extra_files=extra, checkpoints=ckpt)
    if ckpt is not None:
        ckpt.remove()  # the saved model supersedes them
    if eval_cfg and args.from_disk:  # the pruned blocks are on disk now: evaluate them from there
        pruned_model, _ = load_model(str(out), dtype=args.dtype, from_disk=True)
        pruned = _evaluate_on(pruned_model, tokenizer, eval_cfg, device, "pruned")
        summary["eval"] = {"dense": dense, "pruned": pruned}
        write_json_atomic(out / "alsparse_eval.json", summary["eval"])
    print(json.dumps(summary, indent=2, default=str))
    sys.stdout.flush()  # the machine-readable summary first; what a person reads ends the output
    print(format_report(report), file=sys.stderr)
    if eval_cfg:
        print(format_side_by_side(dense, pruned), file=sys.stderr)
    print(next_steps(out), file=sys.stderr)
    return 0


def next_steps(out: Path) -> str:
    import shlex

    return (f"next: evaluate it with  alsparse eval {shlex.quote(str(out))} --ppl wikitext2,ptb --seq-len 1024 "
            f"--limit 40 --tasks piqa,arc_easy\n      or load it with  AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _evaluate_on(model, tokenizer, cfg, device, label):
    from .eval import evaluate
    from .lazy import is_lazy
    from .models import streamed

    logging.getLogger("alsparse").info("evaluating the %s model", label)
    if is_lazy(model):
        import torch

        with streamed(model, torch.device(device)):
            return evaluate(model, tokenizer, cfg)
    home = next(model.parameters()).device
    model.to(device)
    try:
        return evaluate(model, tokenizer, cfg)
    finally:
        model.to(home)


def format_side_by_side(dense: dict, pruned: dict) -> str:
    lines = [f"{'metric':48s} {'dense':>10s} {'pruned':>10s}"]
    for name, r in dense["token_ppl"].items():
        label = f"token-ppl {name} ({r['split']}, seq_len {r['seq_len']}, {r['windows']} windows)"
        lines.append(f"{label:48s} {r['ppl']:10.4f} {pruned['token_ppl'][name]['ppl']:10.4f}")
    for name, r in dense["word_ppl"].items():
        lines.append(f"{'word-ppl ' + name:48s} {r['word_perplexity']:10.4f} {pruned['word_ppl'][name]['word_perplexity']:10.4f}")
    for name, r in dense["tasks"].items():
        label = f"{name} {r['metric_of_record']} (n={r['n']})"
        lines.append(f"{label:48s} {r['value']:10.4f} {pruned['tasks'][name]['value']:10.4f}")
    if dense.get("tasks_mean"):
        lines.append(f"{'zero-shot mean (metric of record)':48s} {dense['tasks_mean']['value']:10.4f} "
                     f"{pruned['tasks_mean']['value']:10.4f}")
    from .eval.api import compute_note, headline_note

    notes = [headline_note(dense["token_ppl"], flag_prefix="eval-"), compute_note(dense.get("compute_dtype"))]
    return "\n".join(lines + [n for n in notes if n])


def sample_calibration_from(source: str, tokenizer, nsamples: int, seqlen: int, seed: int):
    from .data.calibration import fingerprint, sample_calibration
    from .data.text import load_corpus

    if nsamples < 1 or seqlen < 2:
        raise UsageError(f"--nsamples must be >= 1 and --seq-len >= 2, got {nsamples} and {seqlen}")
    from .data.text import CORPORA, is_text_path

    if is_text_path(source):
        text, name = load_corpus(source), source
    else:
        # never calibrate on the split the corpus's perplexity is reported on
        split = "train" if CORPORA.get(source).eval_split == "validation" else "validation"
        text, name = load_corpus(source, split), f"{source} {split}"
    ids = sample_calibration(tokenizer, text, nsamples, seqlen, seed)
    return ids, {"source": name, "seed": seed, "fingerprint": fingerprint(ids)}


def _check_seqlen(model, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise UsageError(f"--seq-len {seqlen} is longer than the model's context ({limit} positions)")


def _check_vocab(model, ids) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(ids.max()) >= vocab:
        raise UsageError(f"the tokenizer produced token id {int(ids.max())} but the model has only {vocab} embeddings")


def format_report(report) -> str:
    rows = report.per_block()
    lines = ["block  allocated  achieved      weights"]
    if len({round(r["allocated"], 6) for r in rows}) == 1 and all(abs(r["achieved"] - r["allocated"]) < 5e-5
                                                                  for r in rows):
        lines.append(f"{'all':5s}  {rows[0]['allocated']:9.4f}  {rows[0]['achieved']:8.4f}  "
                     f"{sum(r['numel'] for r in rows):11d}   (all {len(rows)} blocks at the same ratio)")
    else:
        for row in rows:
            lines.append(f"{row['block']:5d}  {row['allocated']:9.4f}  {row['achieved']:8.4f}  {row['numel']:11d}")
    lines.append(
        f"total  {report.allocated_sparsity:9.4f}  {report.achieved_sparsity:8.4f}  {report.prunable:11d}"
        f"   (size-weighted over prunable linears; embeddings and lm_head excluded)"
    )
    return "\n".join(lines)


COMMANDS = {"prune": _cmd_prune, "eval": _cmd_eval, "ls": _cmd_ls, **sweep_cli.COMMANDS}
INTERRUPTED = {  # what is safe after Ctrl-C, per command
    "prune": "nothing was written to the output directory; rerun with --resume to continue from the checkpoints",
    "sweep": "finished cells are in the results file; rerun to continue",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, InUseError) as exc:
        print(f"alsparse {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"alsparse {args.command}: interrupted; {INTERRUPTED.get(args.command, 'nothing was written')}",
              file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints, then fails
        logging.getLogger("alsparse").debug("failure", exc_info=True)
        print(f"alsparse {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
