"""One training loop for pretraining and fine-tuning (AdamW, warmup + cosine, clipping)."""

from __future__ import annotations

import math
import random

import torch

from .tasks import collate, sample


def train(model, params, tasks: dict, *, steps: int, lr: float, batch: int, seed: int, weight_decay: float = 0.01,
          log=None):
    """Train `params` of `model` on a uniform mixture of `tasks`; returns the last losses."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**collate(sample(tasks, batch, rng))).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def finetune(model, params, tasks, *, mask=None, **kw):
    """Fine-tune; with `mask` (a sidecar path) the protected entries stay bit-identical.

    Uses the tool's public `dowser_tool.protect`, which restores protected entries and
    their AdamW state after every step (zeroing gradients alone lets weight decay and
    momentum move them).
    """
    if mask is None:
        return train(model, params, tasks, **kw)
    import dowser_tool

    handle = dowser_tool.protect(model, mask)
    try:
        losses = train(model, params, tasks, **kw)
        moved = handle.changed()
        assert not moved, f"protected entries moved: {moved[:3]}"
        return losses
    finally:
        handle.remove()
