"""Exact-match accuracy with one teacher-forced forward pass per batch.

All answer tokens (and `</s>`) predicted correctly given the correct prefix is
the same event as greedy decoding writing the whole answer, so no generation
loop is needed.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def accuracy(model, batch, chunk: int = 256) -> float:
    model.eval()
    correct = 0
    n = batch["input_ids"].shape[0]
    for i in range(0, n, chunk):
        part = {k: v[i : i + chunk] for k, v in batch.items()}
        labels = part.pop("labels")
        logits = model(**part).logits[:, :-1]
        target = labels[:, 1:]
        ok = (logits.argmax(-1) == target) | (target == -100)
        correct += int(ok.all(dim=1).sum())
    return correct / n


def scores(model, evals: dict, upstream: list[str], downstream: str) -> dict:
    """Per-task accuracy, the upstream mean, downstream accuracy and H (their harmonic mean)."""
    acc = {t: accuracy(model, b) for t, b in evals.items()}
    up = sum(acc[t] for t in upstream) / len(upstream)
    down = acc[downstream]
    h = 0.0 if up + down == 0 else 2 * up * down / (up + down)
    return {"down": down, "up": up, "H": h, **{f"acc/{t}": a for t, a in acc.items()}}
