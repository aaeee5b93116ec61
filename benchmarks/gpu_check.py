"""GPU check: a 7B-shaped random bf16 checkpoint, streamed `dowser probe` on CUDA vs the in-memory reference.

Writes the checkpoint on the machine itself (Llama-2-7B shapes, bf16, tensor by
tensor), then, in one process, on one GPU:
1. `dowser probe` with a fixed probe file, layers streamed (--resident never: pinned
   host buffers, copies on a side stream overlapping compute): wall time, probe
   tokens per second, bytes read from disk, passes over the weights, peak GPU memory;
2. self-generated probes, layers streamed (every token streams every layer: the
   floor without a memory tier), then the same with the layers kept on the GPU
   (--resident auto: the model's own forward per token, KV cache reused):
   generation and statistics time reported apart;
3. the published algorithm in memory (whole model on the GPU, every parameter
   requiring grad, M forward and backward passes per batch, score matrices
   accumulated): wall time and peak GPU memory on the same probes;
and prints one JSON line per figure, then the ratios to the reference. Sized for
under 8 minutes on one H200.

    python -m benchmarks.gpu_check [--layers 32] [--probes 16 --probe-len 64 --draws 8] [--workdir /tmp/dowser-gpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from .bigger_than_ram import disk_read_bytes, drop_page_cache
from .checkpoints import SHAPES, write_llama


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def run_probe(model_dir: Path, out: Path, settings) -> dict:
    """One probe, with its disk reads and peak GPU memory."""
    from dowser_tool.probe.run import probe

    drop_page_cache(model_dir)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = disk_read_bytes()
    s = probe(str(model_dir), str(out), force=True, progress=False, settings=settings)
    torch.cuda.synchronize()
    s["disk_read_bytes"] = disk_read_bytes() - before
    s["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return s


def figures(name: str, s: dict, size: int, tokens: int | None = None) -> dict:
    t = s["timings"]
    row = {"figure": name, "wall_s": round(s["seconds"], 1), "generate_s": round(t.get("generate_s", 0.0), 1),
           "statistics_s": round(t.get("probe_s", 0.0), 1), "mask_s": round(t.get("mask_s", 0.0), 1),
           "wait_for_weights_s": round(s["wait_s"], 1), "weight_passes": s["weight_passes"], "tier": s["tier"],
           "disk_read_bytes": s["disk_read_bytes"], "disk_over_checkpoint": round(s["disk_read_bytes"] / size, 2),
           "peak_gpu_bytes": s["peak_gpu_bytes"]}
    if tokens:
        row["probe_tokens_per_s"] = round(tokens / max(t.get("probe_s", 0.0), 1e-9), 1)
    return emit(row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--probe-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/dowser-gpu")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args(argv)
    from dowser_tool.probe.run import ProbeSettings

    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    work = Path(args.workdir)
    model_dir = work / "llama-7b-shape"
    t0 = time.perf_counter()
    size = write_llama(model_dir, **{**SHAPES["7b"], "layers": args.layers})
    emit({"figure": "checkpoint", "bytes": size, "layers": args.layers, "write_s": round(time.perf_counter() - t0, 1),
          "gpu": torch.cuda.get_device_name()})
    tokens = torch.randint(3, 32000, (args.probes, args.probe_len), generator=torch.Generator().manual_seed(0))
    probe_file = work / "probes.jsonl"
    probe_file.write_text("\n".join(json.dumps(r) for r in tokens.tolist()) + "\n")

    common = dict(batch_size=args.batch_size, draws=args.draws, device="cuda", dtype="bfloat16")
    ours = figures("probe_file_streamed", run_probe(model_dir, work / "a.dowser.safetensors", ProbeSettings(
        probe_file=str(probe_file), resident="never", **common)), size, tokens.numel())
    for resident in ("never", "auto"):
        g = run_probe(model_dir, work / f"g-{resident}.dowser.safetensors", ProbeSettings(
            probes=args.probes, probe_len=args.gen_tokens + 1, resident=resident, **common))
        row = figures(f"generated_{'streamed' if resident == 'never' else 'resident'}", g, size)
        emit({"figure": f"generation_{row['tier']}", "generated_tokens_per_s":
              round(args.probes * args.gen_tokens / max(g["timings"]["generate_s"], 1e-9), 1)})

    if not args.skip_reference:
        from .reference_probe import load_model, reference_scores

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = load_model(str(model_dir), dtype=torch.bfloat16).to("cuda")
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        reference_scores(model, tokens.cuda(), args.batch_size, args.draws, 0)
        torch.cuda.synchronize()
        ref_s = time.perf_counter() - t1
        ref = emit({"figure": "reference_in_memory", "load_s": round(load_s, 1), "probe_s": round(ref_s, 1),
                    "wall_s": round(load_s + ref_s, 1), "tokens_per_s": round(tokens.numel() / ref_s, 1),
                    "peak_gpu_bytes": torch.cuda.max_memory_allocated()})
        emit({"figure": "ratios", "wall_dowser_over_reference": round(ours["wall_s"] / ref["wall_s"], 3),
              "statistics_dowser_over_reference": round(ours["statistics_s"] / ref["probe_s"], 3),
              "peak_gpu_dowser_over_reference": round(ours["peak_gpu_bytes"] / ref["peak_gpu_bytes"], 3)})
    shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
