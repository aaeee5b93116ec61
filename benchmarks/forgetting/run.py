"""The experiment: pretrain, probe, fine-tune (full / masked / by depth), repair, score."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import models, tool
from . import tasks as T
from .evaluate import scores
from .train import finetune, train

KINDS = {
    "lm": dict(up=T.LM_UPSTREAM, down=T.LM_DOWNSTREAM, example="tiny-llama-tasks"),
    "vlm": dict(up=T.VLM_UPSTREAM, down=T.VLM_DOWNSTREAM, example="tiny-llava-shapes"),
}
MASKS = [  # (row name, probe method, estimator)
    ("dowser-reference", "dowser", "reference"),
    ("dowser-hutchinson", "dowser", "hutchinson"),
    ("wanda", "wanda", None),
    ("magnitude", "magnitude", None),
    ("random", "random", None),
]
REPAIR_SCORES = {"dowser": "dowser-reference", "magnitude": "magnitude", "random": "random"}


def settings(quick: bool) -> dict:
    """Budgets per kind (lm, vlm). Fine-tuning is short and strong on purpose: long enough for
    full fine-tuning to learn the new task and forget, the regime the benchmark measures."""
    if quick:  # CI smoke run: every row, small model and budgets
        return dict(size=dict(hidden=64, mlp=128, layers=2, heads=4, vision=32),
                    pretrain_steps={"lm": 400, "vlm": 150}, pretrain_lr={"lm": 3e-3, "vlm": 2e-3},
                    ft_steps={"lm": 200, "vlm": 250}, ft_lr=3e-3, batch=32, ft_batch=32,
                    n_eval=64, probes=8, depths=(0.5, 1.0), restore=(0.1, 0.5))
    return dict(size=dict(hidden=128, mlp=256, layers=4, heads=4, vision=64),
                pretrain_steps={"lm": 2500, "vlm": 800}, pretrain_lr={"lm": 3e-3, "vlm": 2e-3},
                ft_steps={"lm": 300, "vlm": 150}, ft_lr=2e-3, batch=64, ft_batch=32,
                n_eval=256, probes=64, depths=(0.25, 0.5, 1.0), restore=(0.02, 0.1, 0.3, 0.5, 0.9))


class Run:
    def __init__(self, kind: str, out: Path, cfg: dict, log=print):
        self.kind, self.cfg, self.log = kind, cfg, log
        self.up, self.down = KINDS[kind]["up"], KINDS[kind]["down"]
        self.downstream = next(iter(self.down))
        self.dir = Path(out) / kind
        self.evals = {t: T.eval_set(fn, cfg["n_eval"], 10_000 + i)
                      for i, (t, fn) in enumerate({**self.up, **self.down}.items())}
        self.rows = []

    def score(self, model, group: str, method: str, seed, setting=None):
        row = dict(kind=self.kind, group=group, method=method, setting=setting, seed=seed,
                   **scores(model, self.evals, list(self.up), self.downstream))
        self.rows.append(row)
        self.log(f"  {group:8s} {method:22s} {str(setting):6s} seed {seed}: "
                 f"down {row['down']:.3f} up {row['up']:.3f} H {row['H']:.3f}")
        return row

    def pretrain(self, seed: int) -> Path:
        cfg = self.cfg
        model = models.build(self.kind, cfg["size"], seed)
        train(model, list(model.parameters()), self.up, steps=cfg["pretrain_steps"][self.kind],
              lr=cfg["pretrain_lr"][self.kind], batch=cfg["batch"], seed=seed, weight_decay=0.1, log=self.log)
        self.base = models.save(model, self.dir / "base")
        self.score(model, "zero-shot", "pretrained", seed)
        return self.base

    def finetune(self, seed: int, depth: float, mask: Path | None, save: Path | None = None):
        model = models.load(self.base)
        n = len(models.decoder_layers(model))
        params = models.tune_only(model, max(1, round(depth * n)))
        finetune(model, params, self.down, mask=mask, steps=self.cfg["ft_steps"][self.kind],
                 lr=self.cfg["ft_lr"], batch=self.cfg["ft_batch"], seed=seed)
        if save:
            models.save(model, save)
        return model

    def seed_run(self, seed: int):
        cfg, d = self.cfg, self.dir / f"seed{seed}"
        d.mkdir(parents=True, exist_ok=True)
        sidecars = {}
        for name, method, est in MASKS:
            sidecars[name] = tool.probe(self.base, d / f"{name}.dowser.safetensors", method, seed,
                                        estimator=est or "reference", probes=cfg["probes"])
        full = d / "full-ft"
        self.score(self.finetune(seed, 1.0, None, save=full), "train", "full-ft", seed, 1.0)
        for name, _, _ in MASKS:
            self.score(self.finetune(seed, 1.0, sidecars[name]), "train", name, seed, 1.0)
        for depth in cfg["depths"]:
            if depth < 1.0:
                self.score(self.finetune(seed, depth, None), "depth", "full-ft", seed, depth)
                self.score(self.finetune(seed, depth, sidecars["dowser-reference"]), "depth", "dowser-reference",
                           seed, depth)
        self.repair_sweep(seed, d, full, sidecars)

    def repair_sweep(self, seed: int, d: Path, full: Path, sidecars: dict):
        for F in self.cfg["restore"]:
            for score, name in REPAIR_SCORES.items():
                out = d / f"repair-{score}-{F}"
                if score == "random":  # no statistics: probe a random mask at ratio 1 - F
                    mask = tool.probe(self.base, d / f"random-{F}.dowser.safetensors", "random", seed, ratio=1 - F)
                    tool.repair(self.base, full, mask, None, out)
                else:
                    tool.repair(self.base, full, sidecars[name], F, out)
                self.score(models.load(out), "repair", score, seed, F)
                shutil.rmtree(out)
            out = tool.repair_delta_weighted(self.base, full, sidecars["dowser-reference"], F,
                                             d / f"repair-delta-{F}")
            self.score(models.load(out), "repair", "dowser x |FT-BASE|", seed, F)
            shutil.rmtree(out)


def run_kind(kind: str, out: Path, seeds, quick: bool, pretrain_seed: int = 0, log=print) -> list[dict]:
    r = Run(kind, out, settings(quick), log)
    t0 = time.time()
    log(f"[{kind}] pretraining (seed {pretrain_seed})")
    r.pretrain(pretrain_seed)
    for seed in seeds:
        log(f"[{kind}] seed {seed}")
        r.seed_run(seed)
    log(f"[{kind}] done in {time.time() - t0:.0f}s")
    return r.rows
