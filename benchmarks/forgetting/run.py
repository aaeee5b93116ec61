"""The experiment: pretrain, probe, fine-tune (full / masked, by depth), repair post hoc, score."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import models, tool
from . import tasks as T
from .evaluate import scores
from .repairs import Pair, Swap
from .train import finetune, train

KINDS = {
    "lm": dict(up=T.LM_UPSTREAM, down=T.LM_DOWNSTREAM, example="tiny-llama-tasks"),
    "vlm": dict(up=T.VLM_UPSTREAM, down=T.VLM_DOWNSTREAM, example="tiny-llava-shapes"),
}
# Masks for masked training, all at update ratio 0.1: (row name, probe method, extra probe arguments).
MASKS = {
    "lm": [("dowser", "dowser", ()), ("wanda", "wanda", ()), ("magnitude", "magnitude", ()), ("random", "random", ())],
    "vlm": [("dowser", "dowser", ()), ("dowser-images", "dowser", ("--images",)), ("wanda", "wanda", ()),
            ("magnitude", "magnitude", ()), ("random", "random", ())],
}

# Post-hoc repairs of the full fine-tune: family -> (repair function, sidecar whose score it uses or
# None, [parameter sets]). Every family is swept; the report compares each family's best point.
# `strength` maps a parameter set to one number in [0, 1] (how far toward BASE) for the plots.
POSTHOC = {
    "interpolation": ("interpolate", None, [dict(alpha=a) for a in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)]),
    "ties": ("ties", None, [dict(density=d) for d in (0.1, 0.3, 0.5, 0.7)]),
    "dare": ("dare", None, [dict(drop=p) for p in (0.5, 0.9)]),
    "dowser --restore": ("restore_top", "dowser", [dict(restore=F) for F in (0.02, 0.05, 0.1, 0.3)]),
    "wanda --restore": ("restore_top", "wanda", [dict(restore=F) for F in (0.02, 0.1)]),
    "dowser shrink": ("score_shrink", "dowser", [dict(strength=s) for s in (0.1, 0.25, 0.5)]),
    "dowser rank": ("rank_interpolate", "dowser",
                    [dict(alpha_low=lo, alpha_high=hi) for lo, hi in ((1.0, 0.6), (1.0, 0.8), (0.3, 0.7))]),
    "dowser restore+interp": ("restore_interpolate", "dowser",
                              [dict(restore=F, alpha=a) for F, a in ((0.02, 0.8), (0.02, 0.9), (0.05, 0.9))]),
    "dowser trim": ("score_trim", "dowser", [dict(density=d, power=0.5) for d in (0.1, 0.4, 0.7)]),
    "dowser per-matrix": ("layer_interpolate", "dowser", [dict(alpha=a, spread=0.5) for a in (0.6, 0.9)]),
}
DOWSER_REPAIRS = [f for f, (_, sc, _) in POSTHOC.items() if sc == "dowser"]
BASELINE_REPAIRS = ["interpolation", "ties", "dare"]


def grid(family: str, quick: bool) -> list[dict]:
    """A family's settings: all of them, or its first and last for --quick."""
    settings_ = POSTHOC[family][2]
    return [settings_[0], settings_[-1]] if quick and len(settings_) > 1 else settings_


def strength(method: str, p: dict) -> float:
    """One number per repair setting for the plots: 0 = FT unchanged, 1 = BASE (roughly)."""
    if method == "interpolate" or method == "layer_interpolate":
        return 1 - p["alpha"]
    if method in ("ties", "score_trim"):
        return 1 - p["density"]
    if method == "dare":
        return p["drop"]
    if method == "restore_top":
        return p["restore"]
    if method == "score_shrink":
        return p["strength"] / (1 + p["strength"])
    if method == "rank_interpolate":
        return 1 - (p["alpha_low"] + p["alpha_high"]) / 2
    if method == "restore_interpolate":
        return 1 - p["alpha"] * (1 - p["restore"])
    raise KeyError(method)


def label(p: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in p.items())


def settings(quick: bool) -> dict:
    """Budgets per kind. Fine-tuning is short and strong on purpose: long enough for full
    fine-tuning to learn the new task and forget, the regime the benchmark measures; tuning
    fewer layers gets more steps (the last quarter of the LM cannot learn `rotate` in 300)."""
    if quick:  # CI smoke run: every row, small model and budgets
        return dict(quick=True, size=dict(hidden=64, mlp=128, layers=2, heads=4, vision=32),
                    pretrain_steps={"lm": 300, "vlm": 200}, pretrain_lr={"lm": 3e-3, "vlm": 3e-3},
                    ft_steps={"lm": {0.5: 100, 1.0: 100}, "vlm": {0.5: 80, 1.0: 80}}, ft_lr=5e-3, batch=32,
                    ft_batch=16, n_eval=48, probes=4, depths=(0.5, 1.0), depth_seeds=1)
    return dict(quick=False, size=dict(hidden=128, mlp=256, layers=4, heads=4, vision=64),
                pretrain_steps={"lm": 2500, "vlm": 1000}, pretrain_lr={"lm": 3e-3, "vlm": 3e-3},
                ft_steps={"lm": {0.25: 600, 0.5: 400, 1.0: 300}, "vlm": {0.25: 300, 0.5: 200, 1.0: 200}},
                ft_lr=2e-3, batch=64, ft_batch=32, n_eval=128, probes=64, depths=(0.25, 0.5, 1.0), depth_seeds=2)


class Run:
    def __init__(self, kind: str, out: Path, cfg: dict, log=print):
        self.kind, self.cfg, self.log = kind, cfg, log
        self.up, self.down = KINDS[kind]["up"], KINDS[kind]["down"]
        self.downstream = next(iter(self.down))
        self.dir = Path(out) / kind
        self.evals = {t: T.eval_set(fn, cfg["n_eval"], 10_000 + i)
                      for i, (t, fn) in enumerate({**self.up, **self.down}.items())}
        self.rows, self.notes = [], []

    def score(self, model, group: str, method: str, seed, depth=None, setting=None, strength=None):
        row = dict(kind=self.kind, group=group, method=method, depth=depth, setting=setting, strength=strength,
                   seed=seed, **scores(model, self.evals, list(self.up), self.downstream))
        self.rows.append(row)
        self.log(f"  {group:8s} {method:22s} {str(depth):5s} {setting or '':24s} seed {seed}: "
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
        finetune(model, params, self.down, mask=mask, steps=self.cfg["ft_steps"][self.kind][depth],
                 lr=self.cfg["ft_lr"], batch=self.cfg["ft_batch"], seed=seed)
        if save:
            models.save(model, save)
        return model

    def seed_run(self, seed: int, masked_depths):
        d = self.dir / f"seed{seed}"
        d.mkdir(parents=True, exist_ok=True)
        sidecars = {name: tool.probe(self.base, d / f"{name}.dowser.safetensors", method, seed,
                                     probes=self.cfg["probes"], extra=extra)
                    for name, method, extra in MASKS[self.kind]}
        for depth in self.cfg["depths"]:
            full = d / f"full-ft-{depth}"
            model = self.finetune(seed, depth, None, save=full)
            self.score(model, "train", "full-ft", seed, depth)
            self.posthoc(seed, depth, model, full, sidecars)
            shutil.rmtree(full)
            if depth in masked_depths:
                for name, _, _ in MASKS[self.kind]:
                    self.score(self.finetune(seed, depth, sidecars[name]), "train", name, seed, depth)

    def posthoc(self, seed: int, depth: float, model, full: Path, sidecars: dict):
        """Every POSTHOC setting applied to the full fine-tune in memory (repairs.Pair / Swap)."""
        swap = Swap(model, full)
        pairs = {}
        for family, (fn, score_from, _) in POSTHOC.items():
            key = score_from or "dowser"  # score-free methods read the same matrices
            if key not in pairs:
                pairs[key] = Pair(self.base, full, sidecars[key])
            for p in grid(family, self.cfg["quick"]):
                with swap.using(pairs[key].apply(fn, seed=seed, **p)) as m:
                    self.score(m, "posthoc", family, seed, depth, label(p), strength(fn, p))
        if not self.notes:
            self.notes.append(f"{self.kind}: " + crosscheck(pairs["dowser"]))


def crosscheck(pair: Pair) -> str:
    """Our interpolation, TIES and DARE against mergekit's on every matrix of one real BASE/FT pair."""
    try:
        import torch
        from importlib.metadata import version
        from mergekit.merge_methods import merge_tensors
    except ImportError:
        return ("mergekit is not installed (`pip install -e .[bench]`), so the baselines were not cross-checked "
                "in this run; tests/test_repair.py checks them when it is")
    from dowser_tool.repair import methods as R
    worst = {}
    for i, n in enumerate(pair.names):
        b, f = pair.base[n], pair.ft[n]
        torch.manual_seed(i)
        theirs = {
            "interpolation 0.6": merge_tensors([b, f], "task_arithmetic", parameters={"weight": 1.0, "lambda": 0.6},
                                               base_index=0),
            "ties 0.3": merge_tensors([b, f], "ties", parameters={"weight": 1.0, "density": 0.3}, base_index=0),
            "dare 0.9": merge_tensors([b, f], "dare_linear", parameters={"weight": 1.0, "density": 0.1, "lambda": 10.0,
                                                                         "rescale": False}, base_index=0),
        }
        ours = {"interpolation 0.6": R.interpolate(b, f, 0.6), "ties 0.3": R.ties(b, f, 0.3),
                "dare 0.9": R.dare(b, f, 0.9, 1.0, torch.Generator().manual_seed(i))}
        for k in ours:
            worst[k] = max(worst.get(k, 0.0), float((ours[k] - theirs[k]).abs().max()))
    return (f"baselines cross-checked against mergekit {version('mergekit')} on all {len(pair.names)} matrices of the "
            "first full fine-tune (DARE as mergekit's dare_linear with rescale off and lambda 1/(1-p), the paper's "
            "rescaling; its default L1 rescaling differs): max |difference| "
            + ", ".join(f"{k}: {v:.1e}" for k, v in worst.items()))


def run_kind(kind: str, out: Path, seeds, quick: bool, pretrain_seed: int = 0, log=print) -> list[dict]:
    r = Run(kind, out, settings(quick), log)
    t0 = time.time()
    log(f"pretraining (seed {pretrain_seed})")
    r.pretrain(pretrain_seed)
    depths = r.cfg["depths"]
    for i, seed in enumerate(seeds):
        # Masked training at every depth for the first `depth_seeds` seeds, at full depth for all.
        masked = depths if i < r.cfg["depth_seeds"] else [1.0]
        log(f"seed {seed}")
        r.seed_run(seed, masked)
        # Rows so far, so an interrupted run can still be reported (`--report-only --partial WORK`).
        (r.dir / "rows.json").write_text(json.dumps({"rows": r.rows, "notes": r.notes}))
    log(f"done in {time.time() - t0:.0f}s")
    return r.rows, r.notes


def run_in_process(args: tuple) -> tuple[str, list[dict], list[str], float]:
    """One kind, for a worker process: torch with `threads` threads; (kind, rows, notes, wall seconds)."""
    kind, work, seeds, quick, threads = args
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    rows, notes = run_kind(kind, work, seeds, quick, log=lambda m: print(f"[{kind}] {m}", flush=True))
    return kind, rows, notes, time.time() - t0
