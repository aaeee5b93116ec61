"""The experiment on the real model: masks, fine-tunes, post-hoc repairs, one JSON line per result.

A *unit* is one (method, seed) fine-tune and its evaluation; the `full` unit also writes the
fine-tune and evaluates every post-hoc repair of it. Units run in worker processes (one torch thread
each), each worker loading the model and encoding the evaluation sets once. Every finished result is
appended to WORK/results.jsonl at once, so a report can be made from whatever finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from . import asset, posthoc, suite as SU, tool
from . import train as TR
from .model import Batch, tuned_names

FROZEN = 10  # first 10 of 30 decoder layers frozen: the last 20 (2/3) are tuned, as in the paper
LAYERS = "last:20"


def settings(quick: bool) -> dict:
    if quick:  # CI smoke run: every method and repair family once, small budgets
        return dict(quick=True, steps=6, batch=4, lr=5e-4, lora_lr=2e-3, probes=4, draws=1, probe_len=16,
                    interpolate=[0.5], restore=[0.1], ties=[0.3], dare=[0.9], lines=[0.5], dg=[1.0])
    return dict(quick=False, steps=40, batch=8, lr=5e-4, lora_lr=2e-3, probes=64, draws=8, probe_len=64,
                interpolate=[0.3, 0.5, 0.7, 0.9], restore=[0.02, 0.05, 0.1, 0.3],
                ties=[0.3], dare=[0.9], lines=[0.0, 0.5], dg=[1.0])


SMALL_RATIO = 0.02  # update ratio of the small-budget cause experiment
# method name -> (train.run method, sidecar key or None, learning-rate key or value)
METHODS = {
    "full-ft": ("full", None, "lr"),
    "lora": ("lora", None, "lora_lr"),
    "dowser": ("full", "dowser", "lr"),
    "wanda": ("full", "wanda", "lr"),
    "magnitude": ("full", "magnitude", "lr"),
    "random": ("full", "random", "lr"),
    "dowser sparse-adapter": ("sparse-adapter", "dowser", "lr"),
    "supertuning-top": ("supertuning-top", None, "lr"),
    "supertuning-bottom": ("supertuning-bottom", None, "lr"),
    # likely causes, measured when Dowser does not beat random (see RESULTS.md)
    "dowser lr x4": ("full", "dowser", 4),
    "random lr x4": ("full", "random", 4),
    "dowser chat-probes": ("full", "dowser-chat", "lr"),
    # a smaller budget, where which entries are kept should matter more
    f"dowser rho {SMALL_RATIO:g}": ("full", f"dowser-r{SMALL_RATIO:g}", "lr"),
    f"random rho {SMALL_RATIO:g}": ("full", f"random-r{SMALL_RATIO:g}", "lr"),
    f"dowser rho {SMALL_RATIO:g} lr x4": ("full", f"dowser-r{SMALL_RATIO:g}", 4),
    f"random rho {SMALL_RATIO:g} lr x4": ("full", f"random-r{SMALL_RATIO:g}", 4),
}


def plan(seeds: list[int], quick: bool, causes: bool = True) -> list[tuple[str, int]]:
    """Units in the order they run: the headline pairs first, then every method at 3 seeds, then
    the headline pairs' extra seeds, then the cause experiments."""
    first = seeds[:3]
    units = []
    for s in first:
        units += [("full-ft", s), ("dowser", s), ("random", s)]
    for s in first:
        units += [("posthoc-extra", s)]
    for s in first:
        units += [(m, s) for m in ("lora", "wanda", "magnitude", "supertuning-top", "supertuning-bottom",
                                   "dowser sparse-adapter")]
    for s in seeds[3:]:
        units += [("full-ft", s), ("dowser", s), ("random", s)]
    if causes and not quick:
        for s in first:
            units += [("dowser lr x4", s), ("random lr x4", s), ("dowser chat-probes", s)]
        for s in first:
            units += [(f"{m} rho {SMALL_RATIO:g}{lr}", s) for lr in ("", " lr x4") for m in ("dowser", "random")]
    return units


def prepare(work: Path, base: Path, cfg: dict, seeds: list[int], log=print) -> dict:
    """Every sidecar (through `dowser probe`), once; returns {key: path} and the probe costs."""
    work.mkdir(parents=True, exist_ok=True)
    sc = {}
    costs = {}
    path = work / "dowser.dowser.safetensors"
    if not path.exists():
        t = time.time()
        tool.probe(base, path, "dowser", layers=LAYERS, probes=cfg["probes"], draws=cfg["draws"],
                   extra=("--probe-len", cfg["probe_len"]), log=log)
        costs["dowser"] = time.time() - t
    sc["dowser"] = path
    tokens = tool.probe_tokens(path, work / "probes.jsonl")
    for method in ("wanda", "magnitude"):
        p = work / f"{method}.dowser.safetensors"
        if not p.exists():
            tool.probe(base, p, method, layers=LAYERS, probes=cfg["probes"],
                       probe_file=tokens if method == "wanda" else None, log=log)
        sc[method] = p
    for s in seeds:
        p = work / f"random-{s}.dowser.safetensors"
        if not p.exists():
            tool.probe(base, p, "random", layers=LAYERS, seed=s, log=log)
        sc[f"random-{s}"] = p
    return {"sidecars": {k: str(v) for k, v in sc.items()}, "probe_seconds": costs}


def small_ratio_sidecars(work: Path, base: Path, dowser_side: Path, seeds: list[int], log=print) -> dict:
    """The Dowser sidecar re-cut at SMALL_RATIO (`dowser mask`), and a random one per seed at that ratio."""
    r = f"r{SMALL_RATIO:g}"
    out = {f"dowser-{r}": work / f"dowser-{r}.dowser.safetensors"}
    if not out[f"dowser-{r}"].exists():
        tool.recut(dowser_side, SMALL_RATIO, out[f"dowser-{r}"], log=log)
    for s in seeds:
        p = out[f"random-{r}-{s}"] = work / f"random-{r}-{s}.dowser.safetensors"
        if not p.exists():
            tool.probe(base, p, "random", layers=LAYERS, seed=s, ratio=SMALL_RATIO, log=log)
    return {k: str(v) for k, v in out.items()}


def chat_probes(base: Path, out_tokens: Path, n: int, length: int, seed: int = 0) -> Path:
    """Data-free probes through the chat template (a cause experiment): the template's user turn around
    1-5 random vocabulary tokens, then the model's own sampled reply (temperature 0.9, top-p 0.9, as the
    tool's probes), cut to `length` tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    rows = []
    for _ in range(n):
        k = int(torch.randint(1, 6, (1,), generator=g))
        words = [int(t) for t in torch.randint(0, tok.vocab_size, (k,), generator=g) if int(t) not in special]
        prompt = tok.apply_chat_template([{"role": "user", "content": tok.decode(words)}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=True, temperature=0.9, top_p=0.9,
                                 repetition_penalty=1.05, max_new_tokens=max(1, length - len(prompt)),
                                 min_new_tokens=max(1, length - len(prompt)), pad_token_id=tok.eos_token_id)
        rows.append(out[0, :length].tolist())
    out_tokens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_tokens


# --- worker side -----------------------------------------------------------------------------------------------
_W: dict = {}


def worker_init(base: str, work: str, quick: bool, threads: int = 1):
    torch.set_num_threads(threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    s = SU.Suite(model, tok, base, FROZEN, quick, log=lambda m: print(f"[{os.getpid()}] {m}", flush=True))
    train = Batch(*SU._qa(tok, [(p, a) for p, a, _ in s.new["train"]]), s.pad).encode(model, FROZEN)
    _W.update(base=base, work=Path(work), tok=tok, suite=s, train=train, quick=quick, cfg=settings(quick))


def _log(msg):
    print(f"[{os.getpid()}] {msg}", flush=True)


def _fresh():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_W["base"], dtype=torch.float32).eval()


def _row(group, method, seed, scores, **extra) -> dict:
    return {"group": group, "method": method, "seed": seed, **_W["suite"].summary(scores), **extra}


def run_unit(unit: tuple[str, int], sidecars: dict, grid_seeds=(0, 1, 2)) -> list[dict]:
    """One (method, seed): fine-tune, evaluate; for full-ft also every post-hoc repair. Returns rows."""
    name, seed = unit
    cfg, s = _W["cfg"], _W["suite"]
    if name == "posthoc-extra":
        return extra_rows(seed)
    fn, key, lr_key = METHODS[name]
    lr = cfg[lr_key] if isinstance(lr_key, str) else cfg["lr"] * lr_key
    side = None
    if key is not None:
        side = sidecars[f"{key}-{seed}"] if key.startswith("random") else sidecars[key]
    t0 = time.time()
    model, info = TR.run(_fresh(), _W["train"], fn, frozen=FROZEN, steps=cfg["steps"], lr=lr,
                         batch_size=cfg["batch"], seed=seed, sidecar=side, log=_log)
    rows = [_row("train", name, seed, s.scores(model), **{k: v for k, v in info.items() if k != "method"})]
    _log(f"{name} seed {seed}: new {rows[0]['new']:.3f} kept {rows[0]['kept']:.3f} ({time.time() - t0:.0f}s)")
    if name == "full-ft":
        rows += posthoc_rows(model, seed, sidecars, keep=seed in grid_seeds)
    return rows


def _load_into(model, tensors: dict):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def _scorer(model, seed: int, rows: list):
    """score(family, setting, strength, tensors, **extra): load the tuned tensors into `model`, evaluate
    it, append the post-hoc row to `rows`."""
    def score(family, setting, strength, tensors, **extra):
        _load_into(model, tensors)
        r = _row("posthoc", family, seed, _W["suite"].scores(model), setting=setting, strength=strength, **extra)
        rows.append(r)
        _log(f"  {family} {setting}: new {r['new']:.3f} kept {r['kept']:.3f}")

    return score


def posthoc_rows(model, seed: int, sidecars: dict, keep: bool) -> list[dict]:
    """`dowser merge` repairs of this full fine-tune (--restore, --interpolate), evaluated in the same model
    object; the fine-tune is kept on disk for `extra_rows` when `keep`."""
    from safetensors.torch import load_file

    cfg, base = _W["cfg"], _W["base"]
    names = tuned_names(model, FROZEN)
    d = _W["work"] / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    ft_dir = d / "full-ft"
    model.save_pretrained(ft_dir)
    params = dict(model.named_parameters())
    ft_t = {n: params[n].detach().clone() for n in names}
    rows = []
    score = _scorer(model, seed, rows)

    def from_folder(folder: Path):
        t = load_file(str(Path(folder) / "model.safetensors"))
        out = {n: t[n] for n in names}
        shutil.rmtree(folder)
        return out

    # dowser merge --restore at every strength (0.1 is its default), then --interpolate (WiSE-FT)
    restores = cfg["restore"]
    for f, folder in tool.merge_restore(base, ft_dir, sidecars["dowser"], restores, d / "restore", log=_log).items():
        score("dowser merge --restore", f"restore={f:g}", f, from_folder(folder))
    for a, folder in tool.merge_interpolate(base, ft_dir, cfg["interpolate"], d / "interp", log=_log).items():
        score("interpolation", f"alpha={a:g}", 1 - a, from_folder(folder))
    _load_into(model, ft_t)
    if keep:
        (ft_dir / "merges-done").write_text("")
    else:
        shutil.rmtree(ft_dir)
    return rows


def extra_rows(seed: int, wait: float = 3600) -> list[dict]:
    """The repairs dowser-tool does not offer (LiNeS, DG-Hard) and its library's TIES and DARE, on the
    fine-tune `posthoc_rows` kept (waits for it when another worker is still writing it)."""
    from safetensors.torch import load_file

    cfg, base = _W["cfg"], _W["base"]
    ft_dir = _W["work"] / f"seed{seed}" / "full-ft"
    t0 = time.time()
    while not (ft_dir / "merges-done").exists():
        if time.time() - t0 > wait:
            raise RuntimeError(f"{ft_dir} never appeared")
        time.sleep(10)
    model = _fresh()
    names = tuned_names(model, FROZEN)
    b_all, f_all = load_file(str(base / "model.safetensors")), load_file(str(ft_dir / "model.safetensors"))
    base_t, ft_t = {n: b_all[n] for n in names}, {n: f_all[n] for n in names}
    del b_all, f_all
    rows = []
    score = _scorer(model, seed, rows)

    n_layers = len(model.model.layers)
    for a in cfg["lines"]:
        score("LiNeS", f"alpha={a:g}", None, posthoc.lines(base_t, ft_t, a, n_layers))
    for c in cfg["dg"]:
        t, kept = posthoc.dg_hard(base_t, ft_t, c)
        score("DG-Hard", f"threshold x{c:g}", None, t, sv_kept=kept)
    for dens in cfg["ties"]:
        score("TIES", f"density={dens:g}", 1 - dens, posthoc.ties(base_t, ft_t, dens))
    for p in cfg["dare"]:
        score("DARE", f"drop={p:g}", p, posthoc.dare(base_t, ft_t, p, seed))
    shutil.rmtree(ft_dir)
    return rows


def run_all(base: Path, work: Path, seeds: list[int], quick: bool, jobs: int, results: Path, causes=True,
            log=print) -> list[dict]:
    """Prepare sidecars, then every unit in `jobs` worker processes; rows appended to `results` as they come."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    cfg = settings(quick)
    meta = prepare(work, base, cfg, seeds, log=log)
    sidecars = meta["sidecars"]
    units = plan(seeds, quick, causes)
    if any(u[0] == "dowser chat-probes" for u in units):
        chat_side = work / "dowser-chat.dowser.safetensors"
        if not chat_side.exists():
            toks = chat_probes(base, work / "chat-probes.jsonl", cfg["probes"], cfg["probe_len"])
            tool.probe(base, chat_side, "dowser", layers=LAYERS, probes=cfg["probes"], draws=cfg["draws"],
                       probe_file=toks, log=log)
        sidecars["dowser-chat"] = str(chat_side)
    if any(f"rho {SMALL_RATIO:g}" in u[0] for u in units):
        sidecars.update(small_ratio_sidecars(work, base, Path(sidecars["dowser"]), seeds[:3], log))
    done = set()
    rows = []
    if results.exists():  # resume: skip units already reported
        for line in results.read_text().splitlines():
            r = json.loads(line)
            rows.append(r)
            if r["group"] == "train":
                done.add((r["method"], r["seed"]))
            if r["group"] == "posthoc" and r["method"] == "LiNeS":
                done.add(("posthoc-extra", r["seed"]))
    todo = [u for u in units if u not in done]
    log(f"{len(todo)} units to run ({len(done)} already in {results})")
    header = {"group": "meta", "settings": cfg, "seeds": seeds, **meta}
    with open(results, "a") as f:
        f.write(json.dumps(header) + "\n")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=worker_init,
                             initargs=(str(base), str(work), quick)) as pool:
        futures = {pool.submit(run_unit, u, sidecars, tuple(seeds[:3])): u for u in todo}
        for fut in as_completed(futures):
            u = futures[fut]
            try:
                new = fut.result()
            except Exception as e:  # a failed unit is reported, the others go on
                new = [{"group": "error", "method": u[0], "seed": u[1], "error": repr(e)[-2000:]}]
                log(f"unit {u} failed: {e!r}")
            with open(results, "a") as f:
                for r in new:
                    f.write(json.dumps(r) + "\n")
            rows += new
    return rows


def base_folder(log=print) -> Path:
    return asset.build(log=log)
