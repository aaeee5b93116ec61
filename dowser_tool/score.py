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


def score_factors(psi: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                  transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right), float32 on psi's device, whose product is the weighted mean outer product
    Psi^T diag(w) A / sum(w) in W's layout: left (out, U) and right (U, in), or for `transposed`
    left (in, U) and right (U, out). psi: (U, out), a: (U, in), w: (U,)."""
    psi, a, w = psi.float(), a.float(), w.float().to(psi.device)
    weighted = psi * (w / w.sum())[:, None]
    a = a.to(psi.device)
    return (a.T, weighted) if transposed else (weighted.T, a)


def score_blocks(W: torch.Tensor, left: torch.Tensor, right: torch.Tensor, block_of):
    """Yield (r0, r1, S[r0:r1]): the score by blocks of `product_rows` rows, each made as
    left[r0:r1] @ right into `block_of(r0, r1)` (a float32 (r1 - r0, cols) tensor) and multiplied
    by |W[r0:r1]| in place. The one definition of the score's bits: `score_matrix` writes the
    blocks into its result, the merge's fused kernel into a reused cache-sized buffer."""
    rows, cols = left.shape[0], right.shape[1]
    step = product_rows(cols)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        block = block_of(r0, r1)
        torch.mm(left[r0:r1], right, out=block)
        yield r0, r1, block.mul_(W[r0:r1].abs())


def score_matrix(W: torch.Tensor, psi: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                 transposed: bool = False) -> torch.Tensor:
    """S = |W| (.) (Psi^T diag(w) A) / sum(w), in float32. psi: (U, out), a: (U, in), w: (U,).

    W is (out, in), or (in, out) with `transposed` (transformers' Conv1D layout, as GPT-2
    stores it); the score has W's own shape either way. Made by `score_blocks`: one
    matrix-sized buffer, the very bits of the merge's fused kernel (merge_kernels.repair_recut).
    """
    if W.dim() == 3:
        return _score_stack(W, psi, a, w, transposed)
    left, right = score_factors(psi, a, w, transposed)
    score = torch.empty(left.shape[0], right.shape[1], device=left.device)
    for _ in score_blocks(W.detach().to(left.device), left, right, lambda r0, r1: score[r0:r1]):
        pass
    return score


def _score_stack(W: torch.Tensor, psi: torch.Tensor, a: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A 3-D expert stack (experts, ., .), each expert's slice scored as its own matrix from its own
    statistics (psi (U, experts * out), a (U, experts * in): the experts' end to end, model/experts.py).
    An expert no probe token reached (psi and a zero in every update) is scored by |W| alone."""
    n = W.shape[0]
    o, i = psi.shape[1] // n, a.shape[1] // n
    out = []
    for e in range(n):
        p, x = psi[:, e * o:(e + 1) * o], a[:, e * i:(e + 1) * i]
        if bool(p.any()) or bool(x.any()):
            out.append(score_matrix(W[e], p, x, w, transposed))
        else:
            out.append(W[e].detach().abs().float().to(psi.device))
    return torch.stack(out)


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
    A 3-D score (an expert stack, (experts, ., .)) is cut expert by expert: k = round(rho *
    numel of one slice) trainable in each.
    """
    if score.dim() == 3:
        return torch.stack([cut_mask(s, rho) for s in score])
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


def bracket_ranks(n: int, k: int, sample: int) -> tuple[int, int]:
    """Ranks (0-based) in a sorted sample of `sample` of `n` values between which the k-th smallest
    of all n very likely lies: the sample quantile k/n, about 8 standard deviations of its rank
    either side (plus 64)."""
    q = k / n * sample
    slack = 8 * (q * (1 - k / n)) ** 0.5 + 64
    return max(0, int(q - slack)), min(sample - 1, int(q + slack))


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
    lo_rank, hi_rank = bracket_ranks(n, k, sample)
    lo, hi = picked[lo_rank], picked[hi_rank]
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
