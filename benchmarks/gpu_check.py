"""GPU check: a 7B-shaped random bf16 checkpoint, streamed `dowser probe` vs the in-memory reference.

Generates the checkpoint on the machine itself (Llama-2-7B shapes, bf16, 2 GB
shards, written layer by layer), then in one process:
1. `dowser probe` on CUDA with a fixed probe file (M draws per batch): wall time,
   probe tokens per second, peak GPU memory;
2. self-generated probes (generation only, a few tokens): generated tokens per second;
3. the published algorithm in memory (whole model on the GPU, all parameters
   requiring grad, M forward+backward passes per batch, score matrices accumulated):
   wall time and peak GPU memory on the same probes;
and prints one JSON line per figure plus the ratios. Sized for < 8 minutes on one H200.

    python -m benchmarks.gpu_check [--layers 32] [--probes 16 --probe-len 64 --draws 8] [--workdir /tmp/dowser-gpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def write_checkpoint(folder: Path, layers: int, hidden=4096, inter=11008, vocab=32000, heads=32) -> int:
    """A Llama checkpoint of random bf16 weights, written tensor by tensor (never the whole model in memory)."""
    from dowser_tool.safetensors_format import StreamingWriter

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
              "dtype": "bfloat16", "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        if current and size + nbytes > 2 << 30:
            shards.append(current)
            current, size = [], 0
        current.append((name, "BF16", shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, specs in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with StreamingWriter(folder / fname, specs) as w:
            for name, _, shape in specs:
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    t = (torch.randn(shape, generator=gen, device="cuda") * 0.02).to(torch.bfloat16).cpu()
                w.write(name, t)
                weight_map[name] = fname
                total += t.numel() * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


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
    from dowser_tool.probe import ProbeSettings, probe

    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    work = Path(args.workdir)
    model_dir = work / "llama-7b-shape"
    t0 = time.perf_counter()
    size = write_checkpoint(model_dir, args.layers)
    emit({"figure": "checkpoint", "bytes": size, "layers": args.layers, "write_s": round(time.perf_counter() - t0, 1),
          "gpu": torch.cuda.get_device_name()})
    tokens = torch.randint(3, 32000, (args.probes, args.probe_len), generator=torch.Generator().manual_seed(0))
    probe_file = work / "probes.jsonl"
    probe_file.write_text("\n".join(json.dumps(r) for r in tokens.tolist()) + "\n")

    torch.cuda.reset_peak_memory_stats()
    common = dict(batch_size=args.batch_size, draws=args.draws, device="cuda", dtype="bfloat16", resident="never")
    s = probe(str(model_dir), str(work / "probe.dowser.safetensors"), force=True, progress=False,
              settings=ProbeSettings(probe_file=str(probe_file), **common))
    ours = emit({"figure": "dowser_probe", "wall_s": round(s["seconds"], 1), "probe_s": round(s["timings"]["probe_s"], 1),
                 "mask_s": round(s["timings"]["mask_s"], 1), "read_s": round(s["read_s"], 1),
                 "wait_for_read_s": round(s["wait_s"], 1),
                 "tokens_per_s": round(tokens.numel() / s["timings"]["probe_s"], 1),
                 "peak_gpu_bytes": torch.cuda.max_memory_allocated()})

    torch.cuda.reset_peak_memory_stats()
    g = probe(str(model_dir), str(work / "gen.dowser.safetensors"), force=True, progress=False,
              settings=ProbeSettings(probes=args.probes, probe_len=args.gen_tokens + 1, **common))
    emit({"figure": "generation", "sequences": args.probes, "steps": args.gen_tokens,
          "generated_tokens_per_s": round(args.probes * args.gen_tokens / g["timings"]["generate_s"], 1),
          "generate_share": round(g["timings"]["generate_s"] / g["seconds"], 3),
          "peak_gpu_bytes": torch.cuda.max_memory_allocated()})

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
              "probe_dowser_over_reference": round(ours["probe_s"] / ref["probe_s"], 3),
              "peak_gpu_dowser_over_reference": round(ours["peak_gpu_bytes"] / ref["peak_gpu_bytes"], 3)})
    shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
