"""Scores and masks from probe statistics (METHOD.md), one weight matrix at a time.

Symbols follow the paper: for a linear layer with weight W (out x in), each
update u (one probe batch) holds a sensitivity vector psi_u (out) and an
activation vector a_u (in) with weight w_u (its batch size). The score is the
weighted mean of the outer products, times |W|:

    S = |W| (.) (Psi^T diag(w) A) / sum(w)

and the mask keeps the k = round(rho * numel) lowest-scoring entries trainable.
"""

from __future__ import annotations

import torch


def score_matrix(W: torch.Tensor, psi: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """S = |W| (.) (Psi^T diag(w) A) / sum(w), in float32. psi: (U, out), a: (U, in), w: (U,)."""
    psi, a, w = psi.float(), a.float(), w.float().to(psi.device)
    outer = (psi * w[:, None]).T @ a.to(psi.device)  # (out, in)
    return W.detach().float().abs().to(psi.device) * outer / w.sum()


def trainable_count(numel: int, rho: float) -> int:
    """k = round(rho * numel): how many entries of a matrix stay trainable."""
    return int(round(rho * numel))


def cut_mask(score: torch.Tensor, rho: float) -> torch.Tensor:
    """Protected-entry mask (True = keep pretrained value): all but the k lowest scores.

    Exactly k entries are trainable; ties at the threshold go to the lowest flat
    indices, so the result depends only on the scores, not on sort internals.
    """
    flat = torch.nan_to_num(score.detach().float().reshape(-1), nan=float("inf"))
    n = flat.numel()
    k = trainable_count(n, rho)
    trainable = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        trainable[:] = True
    elif k > 0:
        t = torch.kthvalue(flat.cpu(), k).values.to(flat.device)
        trainable = flat < t
        need = k - int(trainable.sum())
        if need > 0:
            ties = torch.nonzero(flat == t).reshape(-1)[:need]
            trainable[ties] = True
    return (~trainable).reshape(score.shape)


def validate_ratio(rho: float, what: str = "update ratio") -> float:
    from .errors import DowserError

    if not (isinstance(rho, (int, float)) and 0.0 < float(rho) <= 1.0):
        raise DowserError(f"{what} must be in (0, 1], got {rho!r}")
    return float(rho)
