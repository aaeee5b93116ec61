"""Post-hoc repairs of a full fine-tune that dowser-tool does not implement: LiNeS and DG-Hard.

Both act on the task vector delta = FT - BASE of every tuned matrix (a dict {checkpoint name: tensor}).
Interpolation (WiSE-FT) and the Dowser restore come from `dowser merge` (tool.merge); TIES and DARE
from the project's own implementations (`dowser_tool.repair.methods`), never re-implemented here.
"""

from __future__ import annotations

import re

import torch

from dowser_tool.repair import methods


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def lines(base: dict, ft: dict, alpha: float, n_layers: int) -> dict:
    """LiNeS (Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
    Merging", ICLR 2025, arXiv 2410.17146, eq. 1): the task vector of layer l (0-based, of L) is scaled
    by lambda(l) = alpha + (1 - alpha) * l / (L - 1): shallow layers shrink toward BASE, the last layer
    keeps the full fine-tune (beta = 1 - alpha, the paper's single-task setting)."""
    out = {}
    for n in ft:
        layer = int(_LAYER.search(n).group(1))
        lam = alpha + (1 - alpha) * layer / (n_layers - 1)
        b = base[n].float()
        out[n] = (b + lam * (ft[n].float() - b)).to(ft[n].dtype)
    return out


def dg_omega(beta: float) -> float:
    """Gavish & Donoho ("The Optimal Hard Threshold for Singular Values is 4/sqrt(3)", IEEE Trans. Inf.
    Theory 2014, eq. 5): for unknown noise, tau = omega(beta) * median singular value, with the
    approximation omega(beta) ~ 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43 (beta = aspect ratio <= 1)."""
    return 0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43


def dg_hard(base: dict, ft: dict, scale: float = 1.0) -> tuple[dict, float]:
    """DG-Hard: per matrix, the SVD of delta keeping only singular values above scale * omega(beta) *
    median(sigma) (scale 1: the Donoho-Gavish rule; other scales are a strength sweep around it).
    Returns (repaired tensors, mean fraction of singular values kept)."""
    out, kept = {}, []
    for n in ft:
        b = base[n].float()
        d = ft[n].float() - b
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        m, k = d.shape
        tau = scale * dg_omega(min(m, k) / max(m, k)) * float(s.median())
        keep = s > tau
        kept.append(float(keep.float().mean()))
        out[n] = (b + (u[:, keep] * s[keep]) @ vh[keep]).to(ft[n].dtype)
    return out, sum(kept) / len(kept)


def ties(base: dict, ft: dict, density: float) -> dict:
    return {n: methods.ties(base[n], ft[n], density) for n in ft}


def dare(base: dict, ft: dict, drop: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: methods.dare(base[n], ft[n], drop, generator=gen) for n in sorted(ft)}
