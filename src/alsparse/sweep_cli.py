"""The `sweep` and `report` subcommands. `alsparse.cli` adds them with `add_parsers(sub)` and
its COMMANDS; like every command they print results on stdout, logs go to stderr, and a
ValueError (bad input) becomes exit 2 in `cli.main`."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path


def add_parsers(sub) -> None:
    """Add `sweep` and `report` to an argparse subparsers object."""
    sw = sub.add_parser("sweep", help="run a YAML grid of prune + evaluate cells, appending to a results file")
    sw.add_argument("config", help="sweep YAML (schema: docs/SWEEPS.md)")
    sw.add_argument("--results", default=None,
                    help="results file (JSON lines; default: the YAML's 'results', else <config>.results.jsonl)")
    sw.add_argument("--limit-cells", type=int, default=None, help="stop after computing N new cells")
    sw.add_argument("--dry-run", action="store_true", help="list the planned cells and which are done; compute nothing")
    sw.add_argument("--keep-going", action="store_true",
                    help="log a failing cell and go on (it is not recorded, so a rerun retries it)")
    rp = sub.add_parser("report", help="Markdown tables and PNG figures from sweep results files")
    rp.add_argument("results", nargs="+", help="results file(s) written by 'alsparse sweep'")
    rp.add_argument("--out", default=None, help="output directory (default: the first results file's directory)")
    rp.add_argument("--figures", default=None, metavar="SUBDIR",
                    help="write the PNGs to OUT/SUBDIR and link them from there (default: beside RESULTS.md)")
    rp.add_argument("--cell", action="append", default=[], metavar="ID",
                    help="also show this cell's sweep figures (RM heat map, allocation), copied in as "
                         "cell_<id>_<name>.png; an exact id or a unique prefix of >= 6 characters; repeatable")
    rp.add_argument("--preamble", default=None, metavar="FILE",
                    help="a Markdown file placed after the title (status, protocol notes, conclusions)")


def _cmd_sweep(args) -> int:
    from .sweep import load_spec, plan, run_sweep

    if args.limit_cells is not None and args.limit_cells < 1:
        raise ValueError(f"--limit-cells must be >= 1, got {args.limit_cells}")
    spec = load_spec(args.config)
    results = Path(args.results) if args.results else spec.results
    if args.dry_run:
        cells, done = plan(spec, results)
        print(f"{'id':16s}  {'status':7s}  cell")
        for cell in cells:
            print(f"{cell.id:16s}  {'done' if cell.id in done else 'todo':7s}  {cell.describe()}")
        todo = sum(cell.id not in done for cell in cells)
        print(f"{len(cells)} cells planned, {len(cells) - todo} done, {todo} to compute; results: {results}")
        return 0
    outcome = run_sweep(spec, results, limit_cells=args.limit_cells, keep_going=args.keep_going)
    print(json.dumps(outcome.to_dict(), indent=2))
    return 1 if outcome.failed else 0


def _cmd_report(args) -> int:
    from .results import load_results, write_report

    records = load_results(args.results)
    if not records:
        raise ValueError(f"no finished cells in {', '.join(args.results)}")
    out = Path(args.out) if args.out else Path(args.results[0]).resolve().parent
    preamble = ""
    if args.preamble:
        try:
            preamble = Path(args.preamble).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the preamble {args.preamble}: {exc.strerror or exc}") from None
    command = " ".join(["alsparse report", *map(shlex.quote, args.results), *(["--out", shlex.quote(args.out)]
                        if args.out else []), *(["--figures", shlex.quote(args.figures)] if args.figures else []),
                        *[f"--cell {shlex.quote(c)}" for c in args.cell],
                        *(["--preamble", shlex.quote(args.preamble)] if args.preamble else [])])
    written = write_report(records, out, sources=[Path(p).name for p in args.results], figures_dir=args.figures,
                           cells=args.cell, preamble=preamble, command=command)
    logging.getLogger("alsparse").info("wrote %s", ", ".join(str(p) for p in written))
    print(written[0].read_text(encoding="utf-8"))
    return 0


COMMANDS = {"sweep": _cmd_sweep, "report": _cmd_report}
