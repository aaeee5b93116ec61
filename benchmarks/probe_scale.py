"""`dowser probe` against the in-memory reference algorithm, at several depths and widths.

For each random-weight Llama checkpoint (sharded safetensors), both run in fresh
processes on the same probe tokens and Rademacher draws. Prints one JSON line per
model (peak RSS, wall time, their ratios, Spearman correlation of scores over a
sample of entries, and mask agreement at update ratio 0.1), then a summary line
with the targets: RSS ratio on the largest model, RSS flatness with depth, and
wall-time ratio.

    python -m benchmarks.probe_scale [--widths 512,1024] [--depths 4,16] [--probes 8 --probe-len 32 --draws 8]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from .measure import run_measured


def build(folder: Path, layers: int, hidden: int, vocab: int = 1024) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, max_shard_size="500MB")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    del model
    return size


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = torch.empty_like(x)
    rx[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype)
    ry = torch.empty_like(y)
    ry[y.argsort()] = torch.arange(y.numel(), dtype=y.dtype)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def agreement(sidecar: Path, reference: Path, model: Path, rho: float, sample: int = 200_000) -> dict:
    """Spearman over sampled entries (all matrices) and the fraction of equal mask bits."""
    from safetensors.torch import load_file

    from dowser_tool import Sidecar, open_checkpoint
    from dowser_tool.score import cut_mask, score_matrix

    sc, ref, ckpt = Sidecar(sidecar), load_file(str(reference)), open_checkpoint(model)
    gen = torch.Generator().manual_seed(0)
    xs, ys, same, total = [], [], 0, 0
    per_matrix = max(1, sample // len(sc.names))
    for n in sc.names:
        W = ckpt.read(n)
        ours = score_matrix(W, *sc.stats(n)).reshape(-1)
        theirs = ref[n].reshape(-1)
        idx = torch.randint(0, ours.numel(), (per_matrix,), generator=gen)
        xs.append(ours[idx].double())
        ys.append(theirs[idx].double())
        same += int((sc.mask(n) == cut_mask(ref[n], rho)).sum())
        total += W.numel()
    return {"spearman": round(spearman(torch.cat(xs), torch.cat(ys)), 6), "mask_agreement": round(same / total, 6)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="512,1024")
    ap.add_argument("--depths", default="4,16")
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--probe-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--draws", type=int, default=8)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = tmp / "probes.jsonl"
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 1024, (args.probes, args.probe_len), generator=gen)
        tokens.write_text("\n".join(json.dumps(r) for r in ids.tolist()) + "\n")
        common = ["--batch-size", args.batch_size, "--draws", args.draws]
        for width in map(int, args.widths.split(",")):
            for depth in map(int, args.depths.split(",")):
                folder = tmp / f"llama-{width}x{depth}"
                size = build(folder, depth, width)
                sidecar, ref_out = tmp / "s.dowser.safetensors", tmp / "ref.safetensors"
                ours = run_measured("dowser_tool", ["probe", folder, "--probe-file", tokens, "--out", sidecar, "--force",
                                                    "-q", "--resident", "never", *common])
                theirs = run_measured("benchmarks.reference_probe", [folder, tokens, ref_out, *common])
                row = {
                    "figure": "probe_vs_reference", "width": width, "layers": depth, "checkpoint_bytes": size,
                    "dowser_peak_rss_bytes": ours["peak_rss_bytes"], "reference_peak_rss_bytes": theirs["peak_rss_bytes"],
                    "dowser_wall_s": ours["wall_s"], "reference_wall_s": theirs["wall_s"],
                    "rss_ratio": round(ours["peak_rss_bytes"] / theirs["peak_rss_bytes"], 3),
                    "wall_ratio": round(ours["wall_s"] / theirs["wall_s"], 3),
                    **agreement(sidecar, ref_out, folder, 0.1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                for f in folder.glob("*"):
                    f.unlink()
    largest = max(rows, key=lambda r: r["checkpoint_bytes"])
    widest = [r for r in rows if r["width"] == largest["width"]]
    shallow, deep = min(widest, key=lambda r: r["layers"]), max(widest, key=lambda r: r["layers"])
    summary = {
        "figure": "probe_scale_summary",
        "largest_checkpoint_bytes": largest["checkpoint_bytes"],
        "rss_ratio_largest": largest["rss_ratio"], "rss_ratio_target": 0.3,
        "rss_depth_growth": round(deep["dowser_peak_rss_bytes"] / shallow["dowser_peak_rss_bytes"], 3),
        "rss_depth_growth_target": 1.3, "depths": [shallow["layers"], deep["layers"]],
        "wall_ratio_largest": largest["wall_ratio"], "wall_ratio_target": 0.6,
        "wall_ratio_geomean": round(math.exp(sum(math.log(r["wall_ratio"]) for r in rows) / len(rows)), 3),
        "min_spearman": min(r["spearman"] for r in rows), "min_mask_agreement": min(r["mask_agreement"] for r in rows),
    }
    rows.append(summary)
    print(json.dumps(summary), flush=True)
    return rows


if __name__ == "__main__":
    main()
