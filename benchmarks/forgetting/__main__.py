"""python -m benchmarks.forgetting [--quick] [--seeds 0,1,2] [--out DIR]: the whole benchmark."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from . import report
from .examples import export
from .run import KINDS, run_kind, settings

HERE = Path(__file__).resolve().parent


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.forgetting", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: tiny models and budgets, every row")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kinds", default="lm,vlm")
    ap.add_argument("--out", default=None, help="RESULTS.md, results.json and plots [default: this folder; "
                    "with --quick a temporary folder]")
    ap.add_argument("--work", default=None, help="checkpoints and sidecars [default: a temporary folder]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to others)")
    ap.add_argument("--export-examples", action="store_true",
                    help="copy the pretrained models to examples/ with model cards")
    ap.add_argument("--report-only", action="store_true", help="re-render RESULTS.md from OUT/results.json")
    args = ap.parse_args(argv)
    if args.report_only:
        return report.rerender(Path(args.out) if args.out else HERE)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = args.kinds.split(",")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="forgetting-")) if args.quick else HERE)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="forgetting-work-"))
    rows, wall = [], {}
    t_all = time.time()
    for kind in kinds:
        t0 = time.time()
        kind_rows = run_kind(kind, work, seeds, args.quick)
        rows += kind_rows
        wall[kind] = time.time() - t0
        if args.export_examples:
            export(kind, work / kind / "base", [r for r in kind_rows if r["group"] == "zero-shot"][0])
    wall["total"] = time.time() - t_all
    cmd = "python -m benchmarks.forgetting " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    path = report.write(rows, out, command=cmd.strip(), seeds=seeds, wall=wall, settings=settings(args.quick),
                        upstream={k: list(KINDS[k]["up"]) for k in kinds}, notes=[])
    print(f"wrote {path} ({wall['total']:.0f} s)")
    return path


if __name__ == "__main__":
    main()
