"""Why does a mask win or lose? Masked training with other probe settings, on the run's base model.

    python -m benchmarks.forgetting.investigate --work /tmp/forgetting-full --kind vlm --seeds 0,1,2

Reuses the pretrained model in WORK/KIND/base and writes investigation-KIND-STEPS.md next to
RESULTS.md (which includes it on the next `--report-only`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

from . import report, tool
from .run import Run, settings

HERE = Path(__file__).resolve().parent

VARIANTS = {  # name: (method, update ratio, extra probe arguments)
    "dowser (published: 64 probes x 64 tokens)": ("dowser", 0.1, ()),
    "dowser, 256 probes": ("dowser", 0.1, ("--probes", "256")),
    "dowser, 24-token probes (task length)": ("dowser", 0.1, ("--probe-len", "24")),
    "dowser, noise-image probes": ("dowser", 0.1, ("--images",)),
    "random": ("random", 0.1, ()),
    "dowser, update ratio 0.25": ("dowser", 0.25, ()),
    "random, update ratio 0.25": ("random", 0.25, ()),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--kind", default="vlm")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ft-steps", type=int, default=None, help="fine-tuning steps [default: the benchmark's]")
    ap.add_argument("--only", default=None, help="comma list of variant numbers (0-based) to run")
    ap.add_argument("--full-ft", action="store_true", help="also fine-tune without a mask, for reference")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    cfg = settings(False)
    if args.ft_steps:
        cfg["ft_steps"][args.kind] = args.ft_steps
    only = None if args.only is None else {int(i) for i in args.only.split(",")}
    r = Run(args.kind, Path(args.work), cfg)
    r.base = r.dir / "base"
    d = r.dir / "investigate"
    d.mkdir(exist_ok=True)
    for seed in map(int, args.seeds.split(",")):
        if args.full_ft:
            r.score(r.finetune(seed, 1.0, None), "investigate", "full fine-tuning (no mask)", seed, 1.0)
        for i, (name, (method, ratio, extra)) in enumerate(VARIANTS.items()):
            if ("image" in name and args.kind != "vlm") or (only is not None and i not in only):
                continue
            mask = tool.probe(r.base, d / f"v{i}-s{seed}.dowser.safetensors", method, seed, ratio=ratio, extra=extra)
            r.score(r.finetune(seed, 1.0, mask), "investigate", name, seed, ratio)
    agg = report.aggregate(r.rows)
    lines = [[k[2], _pm(v["down"]), _pm(v["up"]), f"**{_pm(v['H'])}**"] for k, v in agg.items()]
    steps = cfg["ft_steps"][args.kind]
    md = [f"### Investigation ({args.kind}, {steps} fine-tuning steps): masked training with other probe settings, "
          f"seeds {args.seeds}", "", f"`python -m benchmarks.forgetting.investigate {' '.join(argv or sys.argv[1:])}`",
          "", report._table(["mask", "downstream", "upstream mean", "H"], lines), ""]
    (HERE / f"investigation-{args.kind}-{steps}.md").write_text("\n".join(md))


_pm = report._pm

if __name__ == "__main__":
    main()
