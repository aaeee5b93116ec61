"""Post-hoc repairs of a fine-tuned weight matrix from its base: pure tensor functions.

Every function takes one matrix's BASE weight `base` and fine-tuned weight
`finetuned` (same shape, any floating dtype), plus strength parameters and,
for the Dowser repairs, a score matrix of the same shape; it returns the
repaired matrix in BASE's dtype and shape. Arithmetic runs in float32 (float64
inputs stay float64). Nothing is random unless a `torch.Generator` is passed
(DARE), so every output depends on the inputs alone. The task vector is
`delta = finetuned - base` (Ilharco et al. 2023). Every function raises
`DowserError` (one line) when FT or the score has another shape than BASE, the
weights are not floating point, or a fraction (restore, density, drop) is
outside [0, 1].

Baselines from the model-merging literature, for one fine-tune (a list of
fine-tunes where the method defines one):

- `interpolate`: BASE + alpha * delta. WiSE-FT's weight-space ensemble
  (Wortsman et al. 2022, eq. 1) and task-vector scaling (task arithmetic,
  Ilharco et al. 2023, with lambda = alpha): for one fine-tune they are the same.
- `ties`: TIES-Merging (Yadav et al. 2023, section 3): trim each task vector to
  its top-`density` magnitudes, elect the sign by the sign of the summed trimmed
  vectors, average the entries that agree with it, scale by `lam`.
- `dare`: DARE (Yu et al. 2024, eq. 2): drop each delta entry with probability
  `drop`, rescale the survivors by 1 / (1 - drop), scale by `lam`.

Repairs that use the Dowser statistics (docs/FORMAT.md: the score of a weight W
is S = |W| (.) G with G = Psi^T diag(w) A / sum(w), `importance(psi, a, w)`):

- `restore_top`: what `dowser merge --restore F` does, restore the top-F scores
  of the matrix to BASE bit for bit.
- `score_shrink`: pull each entry toward BASE by 1 / (1 + strength * S / mean(S)).
- `rank_interpolate`: interpolate each entry with a weight that falls linearly
  with its score rank, from `alpha_low` (lowest score) to `alpha_high` (highest).
- `restore_interpolate`: restore the top-F entries, interpolate the rest by alpha.
- `score_trim`: TIES's trim ranked by |delta| / (S / mean S)^power.
- `restore_trim`: restore the top-F entries, TIES-trim the rest.
- per-matrix strength (`predicted_effect` + `layer_alpha`): one alpha per matrix,
  set from the fine-tune's predicted effect on the probed outputs (sum of
  G (.) |delta|) relative to the other matrices'.

How they compare on the forgetting benchmark (both models, every tuned depth):
benchmarks/forgetting/RESULTS.md.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import DowserError
from ..score import cut_mask


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _check(base: torch.Tensor, *others: torch.Tensor, what: str = "fine-tuned") -> None:
    if not base.is_floating_point():
        raise DowserError(f"repair needs floating-point weights, got {base.dtype}")
    for t in others:
        if tuple(t.shape) != tuple(base.shape):
            raise DowserError(f"{what} tensor has shape {list(t.shape)} but BASE has {list(base.shape)}")


def _fraction(x: float, what: str) -> float:
    x = float(x)
    if not 0.0 <= x <= 1.0:
        raise DowserError(f"{what} must be in [0, 1], got {x:g}")
    return x


def importance(psi: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """G = Psi^T diag(w) A / sum(w): the Dowser score without its |W| factor, float32 (out, in).

    psi (U, out) and a (U, in) are a sidecar's per-update statistics and w (U,) their
    weights (docs/FORMAT.md); the score of a weight W is |W| (.) G (docs/METHOD.md,
    dowser_tool.scoring.score_matrix). G_ij estimates how strongly the probed outputs
    move per unit change of W_ij, so G (.) |delta| is the fine-tune's predicted effect.
    """
    psi, a, w = psi.float(), a.float(), w.float()
    if psi.dim() != 2 or a.dim() != 2 or w.dim() != 1 or not (psi.shape[0] == a.shape[0] == w.shape[0]):
        raise DowserError(f"statistics do not fit: psi {list(psi.shape)}, a {list(a.shape)}, w {list(w.shape)}")
    return (psi * (w / w.sum())[:, None]).T @ a


def interpolate(base: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """BASE + alpha * (FT - BASE): WiSE-FT (Wortsman et al. 2022, eq. 1) = task-vector scaling.

    alpha 0 gives BASE, 1 gives FT (values outside [0, 1] extrapolate, as task
    arithmetic allows). Returns BASE's dtype and shape.
    """
    _check(base, finetuned)
    # torch.lerp computes base + alpha * (ft - base) and is exact at both ends (alpha 0: BASE, 1: FT).
    return torch.lerp(_work(base), _work(finetuned), float(alpha)).to(base.dtype)


def ties(base: torch.Tensor, finetuned: torch.Tensor | Sequence[torch.Tensor], density: float,
         lam: float = 1.0) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, section 3, "trim, elect sign, disjoint merge").

    For each fine-tune t: tau_t = FT_t - BASE, trimmed to its k = max(1, int(density * numel))
    largest magnitudes (ties at the threshold keep the lower flat index). The elected
    sign is sign(sum_t trimmed tau_t) (zero counts as +, as mergekit does); the merged
    vector averages, per entry, the trimmed values whose sign equals the elected one
    (entries no task keeps stay 0). Output: BASE + lam * merged. With one fine-tune
    this is BASE + lam * trim(delta). Weights of 1 per task (mergekit's `ties` with
    weight 1, normalize true).
    """
    fts = [finetuned] if isinstance(finetuned, torch.Tensor) else list(finetuned)
    _check(base, *fts)
    density = _fraction(density, "TIES density")
    b = _work(base)
    trimmed = torch.stack([_trim(_work(f) - b, density) for f in fts])
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(b.dtype)
    agree = trimmed.sign() == elected
    count = agree.sum(0).clamp(min=1).to(b.dtype)
    merged = (trimmed * agree).sum(0) / count
    return (b + float(lam) * merged).to(base.dtype)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """delta with all but its k largest magnitudes zeroed, k = max(1, int(density * numel)) for
    density > 0 (mergekit's `sparsify.magnitude` rule), 0 for density 0."""
    k = max(1, int(density * delta.numel())) if density > 0 else 0
    if k >= delta.numel():
        return delta
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices
        keep[order[:k]] = True
    return delta * keep.view_as(delta)


def dare(base: torch.Tensor, finetuned: torch.Tensor, drop: float, lam: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE, drop and rescale (Yu et al. 2024, eq. 2): BASE + lam * m (.) delta / (1 - drop).

    m_ij ~ Bernoulli(1 - drop), drawn with `torch.bernoulli` from `generator` (torch's
    global generator when None; pass a seeded one for a deterministic output). The
    1 / (1 - drop) rescaling keeps the expected delta. drop in [0, 1).
    """
    _check(base, finetuned)
    drop = _fraction(drop, "DARE drop rate")
    if drop >= 1.0:
        raise DowserError("DARE drop rate must be below 1")
    b = _work(base)
    keep = torch.bernoulli(torch.full(b.shape, 1.0 - drop, dtype=torch.float32), generator=generator).to(b.dtype)
    return (b + float(lam) * keep * (_work(finetuned) - b) / (1.0 - drop)).to(base.dtype)


def restore_top(base: torch.Tensor, finetuned: torch.Tensor, score: torch.Tensor, restore: float) -> torch.Tensor:
    """`dowser merge --restore F`: the top-F fraction of scores from BASE, bit for bit; the rest FT.

    Cuts with `scoring.cut_mask(score, 1 - restore)`, as merge's re-cut does (exactly
    round((1 - F) * numel) entries keep FT's value).
    """
    _check(base, finetuned, score, what="fine-tuned or score")
    mask = cut_mask(score, 1.0 - _fraction(restore, "restore"))
    return torch.where(mask, base, finetuned.to(base.dtype))


def _normalised(score: torch.Tensor) -> torch.Tensor:
    s = score.detach().float().clamp(min=0)
    mean = s.mean()
    return s / mean if mean > 0 else torch.zeros_like(s)


def score_shrink(base: torch.Tensor, finetuned: torch.Tensor, score: torch.Tensor, strength: float) -> torch.Tensor:
    """BASE + delta / (1 + strength * S / mean(S)): score-weighted interpolation.

    The per-entry minimiser of |theta - FT|^2 + strength * sum S/mean(S) (theta - BASE)^2,
    i.e. a Fisher-weighted merge (Matena & Raffel 2022) of FT with unit importance and
    BASE with importance given by the score (the EWC penalty, Kirkpatrick et al. 2017,
    solved in closed form). An entry of mean score keeps 1 / (1 + strength) of its
    delta; zero-score entries keep all of it. strength >= 0.
    """
    _check(base, finetuned, score, what="fine-tuned or score")
    if strength < 0:
        raise DowserError(f"strength must be >= 0, got {strength:g}")
    b = _work(base)
    factor = 1.0 / (1.0 + float(strength) * _normalised(score).to(b.dtype))
    return (b + factor * (_work(finetuned) - b)).to(base.dtype)


def _rank01(score: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in [0, 1] (0 lowest score, 1 highest; ties by flat index)."""
    flat = score.detach().float().reshape(-1)
    n = flat.numel()
    ranks = torch.empty(n, dtype=torch.float32)
    ranks[torch.sort(flat, stable=True).indices] = torch.arange(n, dtype=torch.float32)
    return (ranks / max(n - 1, 1)).view_as(score)


def rank_interpolate(base: torch.Tensor, finetuned: torch.Tensor, score: torch.Tensor, alpha_low: float,
                     alpha_high: float) -> torch.Tensor:
    """BASE + alpha_ij * delta with alpha_ij = alpha_low + (alpha_high - alpha_low) * rank_ij.

    rank_ij in [0, 1] is the entry's score rank within the matrix (0 = lowest score,
    ties broken by flat index), so with alpha_high < alpha_low the highest-scoring
    entries are pulled furthest toward BASE. alpha_low = alpha_high is `interpolate`.
    """
    _check(base, finetuned, score, what="fine-tuned or score")
    b = _work(base)
    alpha = (float(alpha_low) + (float(alpha_high) - float(alpha_low)) * _rank01(score)).to(b.dtype)
    return (b + alpha * (_work(finetuned) - b)).to(base.dtype)


def restore_interpolate(base: torch.Tensor, finetuned: torch.Tensor, score: torch.Tensor, restore: float,
                        alpha: float) -> torch.Tensor:
    """Restore the top-`restore` scores to BASE (as `restore_top`), BASE + alpha * delta elsewhere."""
    _check(base, finetuned, score, what="fine-tuned or score")
    mask = cut_mask(score, 1.0 - _fraction(restore, "restore"))
    return torch.where(mask, base, interpolate(base, finetuned, alpha))


def restore_trim(base: torch.Tensor, finetuned: torch.Tensor, score: torch.Tensor, restore: float, density: float,
                 lam: float = 1.0) -> torch.Tensor:
    """Restore the top-`restore` scores to BASE, keep the `density` largest |delta| of the rest.

    BASE + lam * delta (.) keep, where keep excludes the top-`restore` entries by score
    (`cut_mask(score, 1 - restore)`, as `dowser merge --restore`) and, of the others,
    keeps the k = max(1, int(density * numel)) largest |delta| (TIES's trim step, Yadav et al.
    2023, ties at the threshold keep the lower flat index). restore 0 is `ties` with
    one fine-tune; density 1 and lam 1 give `restore_top`'s values.
    """
    _check(base, finetuned, score, what="fine-tuned or score")
    protected = cut_mask(score, 1.0 - _fraction(restore, "restore"))
    density = _fraction(density, "density")
    b = _work(base)
    delta = (_work(finetuned) - b).masked_fill(protected, 0.0)
    return (b + float(lam) * _trim(delta, density)).to(base.dtype)


def score_trim(base: torch.Tensor, finetuned: torch.Tensor, score: torch.Tensor, density: float, power: float,
               lam: float = 1.0) -> torch.Tensor:
    """TIES's trim ranked by |delta| / (S / mean S)^power: BASE + lam * delta on the kept entries.

    Keeps the k = max(1, int(density * numel)) entries with the largest
    |delta_ij| * (S_ij / mean S)^-power and resets the others to BASE. power 0 is
    `ties` with one fine-tune; power > 0 needs a larger change to keep an entry the
    base model's outputs depend on (high score), power < 0 a smaller one.
    Zero scores are clamped to 1e-12 of the mean.
    """
    _check(base, finetuned, score, what="fine-tuned or score")
    density = _fraction(density, "density")
    b = _work(base)
    delta = _work(finetuned) - b
    rank = delta.abs() * _normalised(score).clamp(min=1e-12).to(b.dtype) ** (-float(power))
    k = max(1, int(density * delta.numel())) if density > 0 else 0
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.sort(rank.reshape(-1), descending=True, stable=True).indices[:k]] = True
    return (b + float(lam) * delta * keep.view_as(delta)).to(base.dtype)


def predicted_effect(base: torch.Tensor, finetuned: torch.Tensor, g: torch.Tensor) -> float:
    """sum(G (.) |FT - BASE|) / sum(G (.) |BASE|): the fine-tune's first-order effect on the probed
    outputs relative to the matrix's own (Dowser score sum); 0 when the matrix did not move."""
    _check(base, finetuned, g, what="fine-tuned or importance")
    b, gg = _work(base), g.detach().to(_work(base).dtype)
    own = float((gg * b.abs()).sum())
    return float((gg * (_work(finetuned) - b).abs()).sum()) / own if own > 0 else 0.0


def layer_alpha(effects: dict[str, float], alpha: float, spread: float) -> dict[str, float]:
    """One interpolation weight per matrix from `predicted_effect`: alpha * (e / mean e)^-spread, clipped to [0, 1].

    spread 0 gives every matrix `alpha` (plain interpolation); spread > 0 keeps less of
    the delta where the fine-tune moved the probed outputs most. Matrices that did not
    move get 1 (nothing to repair).
    """
    moved = [e for e in effects.values() if e > 0]
    if not moved:
        return {k: 1.0 for k in effects}
    mean = sum(moved) / len(moved)
    return {k: (min(1.0, max(0.0, float(alpha) * (e / mean) ** (-float(spread)))) if e > 0 else 1.0)
            for k, e in effects.items()}
