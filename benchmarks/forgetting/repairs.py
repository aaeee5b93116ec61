"""The adapter between a BASE/FT checkpoint pair with a sidecar and `dowser_tool.repair`.

It does what `dowser merge` does tensor by tensor, for any function of
`dowser_tool.repair`: for every matrix the sidecar covers it reads BASE's and FT's
tensor and the sidecar's statistics, calls the repair function, and puts the
result in place of FT's tensor; every other tensor stays FT's. Scores are
computed once per pair. Results go into a loaded model in memory (`Swap`) so a
sweep of strengths costs one evaluation per point, not one checkpoint write.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from dowser_tool import Sidecar
from dowser_tool.repair import methods as R
from dowser_tool.model.keys import KeyRules

# name -> (function, takes the score matrix, takes G instead of the score)
SCORED = {"restore_top", "score_shrink", "rank_interpolate", "restore_interpolate", "restore_trim", "score_trim"}
PLAIN = {"interpolate", "ties", "dare"}


class Pair:
    """BASE and FT tensors of the matrices a sidecar covers, with their Dowser scores and G.

    `score[name]` = |BASE| (.) G (docs/FORMAT.md), G = `repair.importance(psi, a, w)`.
    """

    def __init__(self, base: Path, ft: Path, sidecar: Path | None):
        b, f = (load_file(str(Path(p) / "model.safetensors")) for p in (base, ft))
        self.sidecar = Sidecar(sidecar) if sidecar else None
        names = self.sidecar.names if self.sidecar else [n for n in f if f[n].dim() == 2 and not torch.equal(b[n], f[n])]
        self.base = {n: b[n] for n in names}
        self.ft = {n: f[n] for n in names}
        self.g, self.score = {}, {}
        if self.sidecar and self.sidecar.has_stats:
            for n in names:
                self.g[n] = R.importance(*self.sidecar.stats(n))
                self.score[n] = self.g[n] * self.base[n].abs().float()

    @property
    def names(self) -> list[str]:
        return list(self.base)

    def apply(self, method: str, score: str = "score", seed: int = 0, **params) -> dict[str, torch.Tensor]:
        """{checkpoint name: repaired tensor} for `repair.<method>(base, ft, [score], **params)`.

        score="score" passes the Dowser score (|W| (.) G), "g" passes G, "effect" passes
        G (.) |FT - BASE| (the fine-tune's predicted effect on the probed outputs). DARE draws its
        drop masks from one generator seeded with `seed`, tensor by tensor in name order.
        """
        if method == "layer_interpolate":
            effects = {n: R.predicted_effect(self.base[n], self.ft[n], self.g[n]) for n in self.names}
            alphas = R.layer_alpha(effects, params["alpha"], params["spread"])
            return {n: R.interpolate(self.base[n], self.ft[n], alphas[n]) for n in self.names}
        fn = getattr(R, method)
        gen = torch.Generator().manual_seed(seed) if method == "dare" else None
        out = {}
        for n in sorted(self.names):
            if method in SCORED:
                out[n] = fn(self.base[n], self.ft[n], self.scores(score, n), **params)
            elif method == "dare":
                out[n] = fn(self.base[n], self.ft[n], generator=gen, **params)
            else:
                out[n] = fn(self.base[n], self.ft[n], **params)
        return out


    def scores(self, which: str, name: str) -> torch.Tensor:
        if which == "score":
            return self.score[name]
        if which == "g":
            return self.g[name]
        if which == "effect":
            return self.g[name] * (self.ft[name].float() - self.base[name].float()).abs()
        raise ValueError(f"unknown score {which!r}")


class Swap:
    """A loaded FT model whose matrices can be replaced for one evaluation and put back."""

    def __init__(self, model, folder: Path):
        rules = KeyRules.of_model(model)
        self.model = model
        params = {rules.canonical(k): p for k, p in model.state_dict(keep_vars=True).items()}
        self._param = lambda ckpt_name: params[rules.canonical(ckpt_name)]

    @contextlib.contextmanager
    def using(self, tensors: dict[str, torch.Tensor]):
        saved = {}
        with torch.no_grad():
            for n, t in tensors.items():
                p = self._param(n)
                saved[n] = p.detach().clone()
                p.copy_(t)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    self._param(n).copy_(t)
