"""Scores and masks from probe statistics (docs/METHOD.md), one weight matrix at a time.

Symbols follow the paper: for a linear layer with weight W (out x in), each
update u (one probe batch) holds a sensitivity vector psi_u (out) and an
activation vector a_u (in) with weight w_u (its batch size). The score is the
weighted mean of the outer products, times |W|:

    S = |W| (.) (Psi^T diag(w) A) / sum(w)

and the mask keeps the k = round(rho * numel) lowest-scoring entries trainable.
"""

from __future__ import annotations

import torch


def score_matrix(W: torch.Tensor, psi: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                 transposed: bool = False) -> torch.Tensor:
    """S = |W| (.) (Psi^T diag(w) A) / sum(w), in float32. psi: (U, out), a: (U, in), w: (U,).

    W is (out, in), or (in, out) with `transposed` (transformers' Conv1D layout, as GPT-2
    stores it); the score has W's own shape either way. The product is made block by block of
    `product_rows` rows, each block multiplied by |W| at once: one matrix-sized buffer, and the
    very blocks (so the very bits) of the merge's fused kernel (merge_kernels.repair_recut).
    """
    psi, a, w = psi.float(), a.float(), w.float().to(psi.device)
    weighted = psi * (w / w.sum())[:, None]
    a = a.to(psi.device)
    # (out, in) or (in, out): the weighted mean outer product in W's layout
    left, right = (a.T, weighted) if transposed else (weighted.T, a)
    score = torch.empty(left.shape[0], right.shape[1], device=psi.device)
    W = W.detach().to(psi.device)
    step = product_rows(score.shape[1])
    for r0 in range(0, score.shape[0], step):
        block = score[r0 : r0 + step]
        torch.mm(left[r0 : r0 + step], right, out=block)
        block.mul_(W[r0 : r0 + step].abs())
    return score


PRODUCT_BLOCK = 1 << 18  # entries per row block of the score product: 1 MiB of float32, cache-resident


def product_rows(cols: int) -> int:
    """Rows per block of the score product (`score_matrix`) for a matrix of `cols` columns."""
    return max(1, PRODUCT_BLOCK // max(cols, 1))


def trainable_count(numel: int, rho: float) -> int:
    """k = round(rho * numel): how many entries of a matrix stay trainable."""
    return int(round(rho * numel))


def cut_mask(score: torch.Tensor, rho: float) -> torch.Tensor:
    """Protected-entry mask (True = keep pretrained value): all but the k lowest scores.

    Exactly k entries are trainable; ties at the threshold go to the lowest flat
    indices, so the result depends only on the scores, not on sort internals.
    """
    flat = score.detach().float().reshape(-1)
    n = flat.numel()
    k = trainable_count(n, rho)
    if k <= 0 or k >= n:
        return torch.full(score.shape, k <= 0, dtype=torch.bool, device=flat.device)
    t = kth_smallest(flat, k)
    if torch.isnan(t):  # NaN scores (NaN weights) reach the threshold: rank them last, as +inf
        flat = torch.nan_to_num(flat, nan=float("inf"))
        t = kth_smallest(flat, k)
    # NaN compares false everywhere, so NaN entries stay protected without a cleaning pass.
    trainable = flat < t
    need = k - int(torch.count_nonzero(trainable))  # count_nonzero: ~10x faster than a Bool sum
    for start in range(0, n, _BLOCK):  # ties, lowest indices first; in blocks: no matrix-sized temporary
        if need <= 0:
            break
        ties = torch.nonzero(flat[start : start + _BLOCK] == t).reshape(-1)[:need]
        trainable[start + ties] = True
        need -= ties.numel()
    return trainable.logical_not_().reshape(score.shape)


_BLOCK = 1 << 20  # entries per block of the counting passes


def kth_smallest(flat: torch.Tensor, k: int, sample: int = 1 << 16) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor, exactly.

    A full selection over tens of millions of entries is the slowest step of
    cutting a mask. A seeded sample brackets the answer between two sample
    quantiles; then one counting pass and a selection among the few entries
    inside the bracket give the exact value. Falls back to a full selection
    if the bracket misses (it practically never does).
    """
    n = flat.numel()
    if n <= 4 * sample:
        return torch.kthvalue(flat.cpu(), k).values.to(flat.device)
    gen = torch.Generator().manual_seed(n * 31 + k)
    idx = torch.randint(0, n, (sample,), generator=gen).to(flat.device)
    picked = flat[idx].sort().values
    q = k / n * sample
    slack = 8 * (q * (1 - k / n)) ** 0.5 + 64  # ~8 standard deviations of a sample quantile's rank
    lo = picked[max(0, int(q - slack))]
    hi = picked[min(sample - 1, int(q + slack))]
    below, parts = 0, []
    for start in range(0, n, _BLOCK):  # in blocks: temporaries of one block, not of the matrix
        block = flat[start : start + _BLOCK]
        below += int(torch.count_nonzero(block < lo))
        parts.append(block[(block >= lo) & (block <= hi)])
    inside = torch.cat(parts)
    if below < k <= below + inside.numel():
        return torch.kthvalue(inside.cpu(), k - below).values.to(flat.device)
    return torch.kthvalue(flat.cpu(), k).values.to(flat.device)


def validate_ratio(rho: float, what: str = "update ratio") -> float:
    from .errors import DowserError

    if not (isinstance(rho, (int, float)) and 0.0 < float(rho) <= 1.0):
        raise DowserError(f"{what} must be in (0, 1], got {rho!r}")
    return float(rho)
