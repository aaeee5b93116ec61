"""python -m benchmarks.forgetting [--quick] [--seeds 0,...,7] [--out DIR]: the whole benchmark."""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import report
from .run import KINDS, run_in_process, settings

HERE = Path(__file__).resolve().parent


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.forgetting", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: tiny models and budgets, every row")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    ap.add_argument("--kinds", default="lm,vlm")
    ap.add_argument("--out", default=None, help="RESULTS.md, results.json and plots [default: this folder; "
                    "with --quick a temporary folder]")
    ap.add_argument("--work", default=None, help="checkpoints and sidecars [default: a temporary folder]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=2, help="kinds run in parallel processes (1: one after the other)")
    ap.add_argument("--export-examples", action="store_true",
                    help="copy the pretrained models to examples/ with model cards")
    ap.add_argument("--report-only", action="store_true", help="re-render RESULTS.md from OUT/results.json")
    ap.add_argument("--partial", default=None, metavar="WORK",
                    help="with --report-only: report the seeds an interrupted run finished (WORK/KIND/rows.json)")
    args = ap.parse_args(argv)
    if args.report_only and args.partial:
        return report.from_partial(Path(args.partial), Path(args.out) if args.out else HERE, args)
    if args.report_only:
        return report.rerender(Path(args.out) if args.out else HERE)
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = args.kinds.split(",")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="forgetting-")) if args.quick else HERE)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="forgetting-work-"))
    jobs = [(k, work, seeds, args.quick, args.threads) for k in kinds]
    t_all = time.time()
    if args.jobs > 1 and len(kinds) > 1:
        # Spawned workers shut down on a sentinel (a Pool would SIGTERM them, which the in-process CLI traps).
        with ProcessPoolExecutor(min(args.jobs, len(kinds)), mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_in_process, jobs))
    else:
        done = [run_in_process(j) for j in jobs]
    rows, notes, wall = [], [], {}
    for kind, kind_rows, kind_notes, seconds in done:
        rows += kind_rows
        notes += kind_notes
        wall[kind] = seconds
        if args.export_examples:
            from .examples import export

            export(kind, work / kind / "base", [r for r in kind_rows if r["group"] == "zero-shot"][0])
    wall["total"] = time.time() - t_all
    cmd = "python -m benchmarks.forgetting " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    path = report.write(rows, out, command=cmd.strip(), seeds=seeds, wall=wall, settings=settings(args.quick),
                        upstream={k: list(KINDS[k]["up"]) for k in kinds}, notes=notes)
    print(f"wrote {path} ({wall['total']:.0f} s)")
    return path


if __name__ == "__main__":
    main()
