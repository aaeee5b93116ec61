"""Peak memory of `dowser probe` does not grow with depth.

Builds the same Llama architecture at two depths (random weights, saved with
save_pretrained), probes each in a fresh process, and prints one JSON line per
model plus one with the ratios: peak RSS grows by far less than the weights do.

    python -m benchmarks.probe_memory [--hidden 768] [--layers 4,16] [--probes 8 --probe-len 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


from .measure import run_measured
from .probe_scale import build


def probe_peak_rss(folder: Path, out: Path, probes: int, probe_len: int) -> tuple[int, float]:
    """Peak RSS (bytes) and wall time of one `dowser probe` run in a fresh process."""
    m = run_measured("dowser_tool", ["probe", folder, "--out", out, "--force", "-q", "--probes", probes,
                                     "--probe-len", probe_len, "--resident", "never"])
    return m["peak_rss_bytes"], m["wall_s"]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", default="4,16")
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--probe-len", type=int, default=16)
    args = ap.parse_args(argv)
    depths = [int(x) for x in args.layers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in depths:
            folder = Path(tmp) / f"llama-{depth}"
            weights = build(folder, depth, args.hidden, vocab=256)  # bytes of the checkpoint's tensors
            peak, wall = probe_peak_rss(folder, Path(tmp) / f"{depth}.dowser.safetensors", args.probes, args.probe_len)
            row = {"figure": "probe_peak_rss", "layers": depth, "hidden": args.hidden, "weights_bytes": weights,
                   "peak_rss_bytes": peak, "wall_s": round(wall, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lo, hi = rows[0], rows[-1]
    summary = {
        "figure": "probe_memory_vs_depth",
        "layers": [lo["layers"], hi["layers"]],
        "weights_growth_bytes": hi["weights_bytes"] - lo["weights_bytes"],
        "peak_rss_growth_bytes": hi["peak_rss_bytes"] - lo["peak_rss_bytes"],
        "rss_growth_over_weights_growth": round(
            (hi["peak_rss_bytes"] - lo["peak_rss_bytes"]) / (hi["weights_bytes"] - lo["weights_bytes"]), 3),
        "peak_ratio": round(hi["peak_rss_bytes"] / lo["peak_rss_bytes"], 3),
    }
    rows.append(summary)
    print(json.dumps(summary), flush=True)
    return rows


if __name__ == "__main__":
    main()
