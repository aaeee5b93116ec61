"""Fine-tuning methods on the tuned block (decoder layers FROZEN..), same data order for all.

- full: every linear weight of the tuned layers.
- lora: peft LoRA on the same modules, rank chosen so its parameter count is about the masked budget.
- mask:<sidecar>: full-size parameters through `dowser_tool.protect` (update ratio 0.1: 10% of each
  matrix trainable, the rest bit-identical to BASE after every step).
- sparse-adapter: the same Dowser mask as a PEFT sparse adapter (`dowser_tool.sparse_adapter`: only the
  trainable entries are parameters, the delta added at their indices), the memory of an adapter.
- supertuning-top / -bottom: peft's Super-Tuning (`SupertuningConfig`, sparsity 0.9: 10% of each
  matrix, largest / smallest magnitudes).

Loss: cross entropy on the answer tokens of the new tasks. AdamW, linear warmup (5%) then cosine,
gradient clipping 1.0. The batches are drawn from one generator seeded by the run's seed, so every
method sees the same examples in the same order.
"""

from __future__ import annotations

import math
import random
import time

import torch

from .model import Batch, causal_lm, layer_params, loss_on

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def order(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample(range(n), batch) for _ in range(steps)]


def _target_regex(frozen: int, n_layers: int) -> str:
    layers = "|".join(str(i) for i in range(frozen, n_layers))
    return rf".*\.layers\.({layers})\.(self_attn|mlp)\.({'|'.join(MODULES)})$"


def lora_rank(model, frozen: int, ratio: float) -> int:
    """LoRA rank whose parameter count is closest to `ratio` of the tuned matrices' entries."""
    params = layer_params(model, frozen)
    entries = sum(p.numel() for p in params)
    per_rank = sum(sum(p.shape) for p in params)
    return max(1, round(ratio * entries / per_rank))


def _tuned_masks(model, sidecar, keep: set) -> dict:
    """The sidecar's masks of the tuned layers' parameters, by parameter name."""
    from dowser_tool import Sidecar

    side = Sidecar(sidecar)
    params = dict(model.named_parameters())
    return {n: side.mask(n) for n in side.names if n in params and id(params[n]) in keep}


def run(model, batch: Batch, method: str, *, frozen: int, steps: int, lr: float, batch_size: int, seed: int,
        sidecar=None, lora_r: int | None = None, log=None) -> tuple[object, dict]:
    """Fine-tune `model` (modified in place, or wrapped by peft); returns (model to evaluate, info)."""
    torch.manual_seed(seed)
    n_layers = len(causal_lm(model).model.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    handle = None
    info = {"method": method, "lr": lr, "steps": steps}
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        r = lora_r or lora_rank(model, frozen, 0.1)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=_target_regex(frozen, n_layers))
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        info["rank"] = r
    elif method == "sparse-adapter":  # the sidecar's trainable set as a PEFT sparse adapter (values = the delta)
        from dowser_tool import sparse_adapter

        keep = set(map(id, layer_params(model, frozen)))  # only the tuned layers' masks, as `protect` trains them
        masks = _tuned_masks(model, sidecar, keep)
        model = sparse_adapter(model, masks)
        params = [p for p in model.parameters() if p.requires_grad]
        info["trainable"], info["protected"] = model.dowser_record["trainable"], model.dowser_record["protected"]
    elif method.startswith("supertuning"):
        from peft import SupertuningConfig, get_peft_model

        cfg = SupertuningConfig(sparsity=0.9, select_top=method.endswith("top"),
                                target_modules=_target_regex(frozen, n_layers))
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = layer_params(model, frozen)
        for p in params:
            p.requires_grad_(True)
        if sidecar is not None:
            from dowser_tool import protect

            handle = protect(model, str(sidecar))
            info["trainable"] = handle.trainable
            info["protected"] = handle.protected
    info["trainable_params"] = info["trainable"] if "trainable" in info else sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    losses = []
    for step, idx in enumerate(order(batch.ids.shape[0], steps, batch_size, seed)):
        loss = loss_on(model, batch, idx, frozen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"    {method} step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                f"({time.time() - t0:.0f}s)")
    model.eval()
    if handle is not None:
        moved = handle.changed()
        assert not moved, f"protected entries moved: {moved[:3]}"
        handle.remove()
    info["seconds"] = time.time() - t0
    info["final_loss"] = sum(losses[-10:]) / len(losses[-10:])
    return model, info
