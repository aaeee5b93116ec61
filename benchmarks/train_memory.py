"""Training memory and step time: full fine-tune, `protect`, the sparse adapter, LoRA (issue 23).

On one random-weight Llama (hidden 256, intermediate 688, 4 layers, vocab 2048; float32, CPU)
and one mask sidecar at rho 0.1 over every decoder linear, trains with AdamW on the same batches:
  (a) full fine-tune: every parameter trainable;
  (b) `protect(model, sidecar)` on the full model (every parameter trainable, protected entries
      restored after each step);
  (c) `sparse_adapter(model, sidecar)`: only the mask's trainable entries are parameters;
  (d) LoRA on the same linears, rank chosen so its trainable count is closest to (c)'s.
Memory is counted from tensors, not RSS, at its peak inside a step (after backward and the
optimizer step, before the gradients are freed): parameters (all, trainable or not), gradients
(`.grad` of every parameter), optimizer state (every tensor in `optimizer.state`), and what the
method itself keeps (`extra`: protect's protected values and masks; the adapter's int32
indices). Activations are not counted (the same batch for all four). Step time (forward,
backward, optimizer step): median of --steps timed steps after 2 warm-up steps, wall clock and
process CPU time (all threads; steadier than wall time on a shared machine).

Prints one JSON line per run with ratios to (a), then one line checking that (b) and (c) give
the same updates to the trainable entries under plain SGD (same indices, values equal up to
float rounding): the maximum absolute difference between protect's weight change and the
adapter's values after --sgd-steps steps.

    python -m benchmarks.train_memory [--steps 10] [--sgd-steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, RHO = 256, 688, 4, 2048, 0.1
BATCH, SEQ = 4, 64


def build_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=HIDDEN // 4, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().train()


def write_mask(model, path: Path) -> Path:
    """A sidecar (checkpoint names = this model's parameter names) cut at RHO from random statistics."""
    from dowser_tool.score import cut_mask, score_matrix
    from dowser_tool.sidecar.file import SidecarData, write_sidecar

    gen = torch.Generator().manual_seed(1)
    w = torch.tensor([4.0, 4.0])
    data = SidecarData(masks={}, update_weights=w)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            psi, a = torch.rand(2, p.shape[0], generator=gen), torch.rand(2, p.shape[1], generator=gen)
            data.masks[name] = cut_mask(score_matrix(p.detach(), psi, a, w), RHO)
            data.psi[name], data.a[name] = psi, a
    return write_sidecar(path, data)


def batches(n: int):
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(n)]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def prepared(kind: str, sidecar: Path):
    """(model to train, extra tensors the method keeps, handle or None)."""
    model = build_model()
    if kind == "full":
        return model, [], None
    if kind == "protect":
        from dowser_tool import protect

        handle = protect(model, sidecar)
        return model, [t for g in handle._guards for t in (g.values, g.mask)], handle
    if kind == "sparse":
        from dowser_tool.train.sparse import sparse_adapter

        adapter = sparse_adapter(model, sidecar)
        return adapter, [b for n, b in adapter.named_buffers() if "supertuning_indices" in n], None
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora_rank(sidecar), lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])), [], None


def lora_rank(sidecar: Path) -> int:
    """The rank whose LoRA trainable count, r * sum(in + out), is closest to the mask's trainable count."""
    from dowser_tool import Sidecar

    side = Sidecar(sidecar)
    trainable = sum(int((~side.mask(n)).sum()) for n in side.names)
    return max(1, round(trainable / sum(sum(side.shapes[n]) for n in side.names)))


def measure(kind: str, sidecar: Path, data, steps: int) -> dict:
    model, extra, handle = prepared(kind, sidecar)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    peak, times, cpu = None, [], []
    for i, ids in enumerate(data[: steps + 2]):
        start, start_cpu = time.perf_counter(), time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if peak is None:  # the peak: gradients and optimizer state both alive
            peak = {"params_bytes": nbytes(model.parameters()),
                    "grads_bytes": nbytes(p.grad for p in model.parameters()),
                    "optimizer_bytes": nbytes(t for s in opt.state.values() for t in s.values()),
                    "extra_bytes": nbytes(extra)}
        opt.zero_grad(set_to_none=True)
    if handle is not None:
        assert handle.changed() == [], "protect let protected entries move"
    peak["peak_bytes"] = sum(peak.values())
    return {"run": kind, "trainable_params": sum(p.numel() for p in params), **peak,
            "step_s": round(statistics.median(times), 4), "step_cpu_s": round(statistics.median(cpu), 4)}


def sgd_check(sidecar: Path, data, steps: int) -> dict:
    """(b) and (c) under SGD (no momentum, no weight decay): protect's weight change at the trainable
    entries against the adapter's values, matrix by matrix. Parameters the mask does not cover
    (embeddings, norms, head) are frozen in (b) too, as the adapter freezes them."""
    from dowser_tool import Sidecar, protect
    from dowser_tool.train.sparse import sparse_adapter

    side = Sidecar(sidecar)
    full = build_model()
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    for name, p in full.named_parameters():
        p.requires_grad_(name in side.names)
    handle = protect(full, sidecar)
    adapter = sparse_adapter(build_model(), sidecar)
    for model in (full, adapter):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for ids in data[:steps]:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    assert handle.changed() == []
    worst, scale, same_indices = 0.0, 0.0, True
    for module, name in adapter.dowser_record["modules"].items():
        layer = adapter.get_base_model().get_submodule(module)
        trainable = torch.nonzero(~side.mask(name).reshape(-1)).reshape(-1)
        idx = layer.supertuning_indices["default"][: trainable.numel()].long()
        same_indices &= torch.equal(idx, trainable)
        delta = (full.get_parameter(name) - before[name]).detach().reshape(-1)[trainable]
        values = layer.supertuning_values["default"].detach()[: trainable.numel()]
        worst = max(worst, (delta - values).abs().max().item())
        scale = max(scale, values.abs().max().item())
    return {"check": "sgd_protect_vs_sparse_adapter", "steps": steps, "same_indices": same_indices,
            "max_abs_diff": worst, "max_abs_update": scale}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sgd-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = batches(args.steps + 2)
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = write_mask(build_model(), Path(tmp) / "bench.dowser.safetensors")
        rows = [measure(kind, sidecar, data, args.steps) for kind in ("full", "protect", "sparse", "lora")]
        full = rows[0]
        for row in rows:
            row["ratio_peak"] = round(row["peak_bytes"] / full["peak_bytes"], 3)
            row["ratio_grads_optimizer"] = round((row["grads_bytes"] + row["optimizer_bytes"])
                                                 / (full["grads_bytes"] + full["optimizer_bytes"]), 3)
            row["ratio_step"] = round(row["step_s"] / full["step_s"], 3)
            row["ratio_step_cpu"] = round(row["step_cpu_s"] / full["step_cpu_s"], 3)
            print(json.dumps(row), flush=True)
        print(json.dumps(sgd_check(sidecar, data, args.sgd_steps)), flush=True)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
