"""Large random-weight Llama checkpoints for the benchmarks, written tensor by tensor.

The model is never whole in memory: each tensor is cut from a pool of N(0, 0.02^2)
values (fresh offsets per tensor) and streamed into its shard, header first, so
writing a 26 GB checkpoint costs a few hundred MB of memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Llama-2 shapes (hidden, intermediate, heads, vocab) by name
SHAPES = {
    "7b": dict(hidden=4096, inter=11008, heads=32, layers=32, vocab=32000),
    "13b": dict(hidden=5120, inter=13824, heads=40, layers=40, vocab=32000),
}


def llama_tensors(hidden: int, inter: int, heads: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a Llama checkpoint as save_pretrained writes it (untied head)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def write_llama(folder: Path, hidden: int, inter: int, heads: int, layers: int, vocab: int,
                shard_bytes: int = 5 << 30, seed: int = 0) -> int:
    """Write a bf16 Llama checkpoint (config.json, shards, index) into `folder`; returns its tensor bytes."""
    from dowser_tool.io.layout import StreamingWriter

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
              "dtype": "bfloat16", "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards, current, size = [], [], 0
    for name, shape in llama_tensors(hidden, inter, heads, layers, vocab).items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, "BF16", shape))
        size += nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 26, generator=gen) * 0.02).to(torch.bfloat16)  # 64 Mi values, 128 MB
    weight_map, total = {}, 0
    for k, specs in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with StreamingWriter(folder / fname, specs, {"format": "pt"}) as w:
            for name, _, shape in specs:
                n = torch.Size(shape).numel()
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
                    reps = -(-(start + n) // pool.numel())
                    t = pool.repeat(reps)[start:start + n].reshape(shape) if reps > 1 else pool[start:start + n].reshape(shape)
                w.write(name, t.contiguous())
                weight_map[name] = fname
                total += n * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total
