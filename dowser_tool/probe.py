"""`dowser probe`: stream a checkpoint, collect Dowser statistics, cut masks, write the sidecar.

For every probe batch b (one *update*), each scored linear layer records
- a_b: mean over batch and tokens of |h| (its input), and
- psi_b: from g = d(xi . f / B)/dz, the gradient of M Rademacher-weighted
  last-position logits f w.r.t. its output z: mean over draws of mean |g|
  (`reference`, as the published scripts) or sqrt(mean over draws of mean g^2)
  (`hutchinson`, the paper's E[g^2] = ||J||^2).
The score of a matrix is |W| (.) sum_b B_b psi_b a_b^T / sum_b B_b (scoring.py).

Schedule (ARCHITECTURE.md, batched over probe batches so each layer is read
twice per run, not twice per batch): capture layer-0 inputs of every batch;
forward through the layers keeping each layer's input; head + M draws give the
gradients at the top; then layer by layer in reverse, reload the layer,
recompute it once from its stored input with gradients on the input only, and
push the M draws through that one graph. Weight gradients are never formed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, open_checkpoint
from .errors import DowserError
from .names import scored_names
from .probes import Sampling, generate_text_probes, image_probe, load_probe_file
from .scoring import cut_mask, score_matrix, validate_ratio
from .sidecar import OUTPUT_HEAD, PackedMask, SidecarData, default_sidecar_name, role_tensors, write_sidecar
from .streaming import BlockRunner, trim_heap

METHODS = ("dowser", "magnitude", "wanda", "random")
ESTIMATORS = ("reference", "hutchinson")
INCLUDES = ("lm_head", "projector", "vision")


@dataclass
class ProbeSettings:
    update_ratio: float = 0.1
    layers: str | None = None  # e.g. "0-11", "last:20", "3,5"; None = all decoder layers
    include: tuple[str, ...] = ()
    probes: int = 64
    probe_len: int = 64
    batch_size: int = 4
    draws: int = 8
    images: bool = False
    estimator: str = "reference"
    method: str = "dowser"
    probe_file: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    save_stats: bool = True
    resident: str = "auto"  # keep loaded layers in memory: auto (if the model is small), always, never
    activation_budget: int | None = None  # bytes of stored layer inputs per pass; None: 1/4 of free RAM
    sampling: Sampling = field(default_factory=Sampling)

    def fingerprint(self) -> dict:
        """The settings that decide the result (a resumed run must match them exactly)."""
        d = asdict(self)
        for k in ("device", "resident", "activation_budget"):
            d.pop(k)
        return d

    def validate(self) -> None:
        validate_ratio(self.update_ratio)
        if self.method not in METHODS:
            raise DowserError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.estimator not in ESTIMATORS:
            raise DowserError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        bad = [x for x in self.include if x not in INCLUDES]
        if bad:
            raise DowserError(f"--include takes {', '.join(INCLUDES)}; got {', '.join(bad)}")
        for name in ("probes", "probe_len", "batch_size", "draws"):
            if getattr(self, name) < 1:
                raise DowserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.probe_len < 2 and not self.probe_file:
            raise DowserError("--probe-len must be at least 2")
        if ({"vision", "projector"} & set(self.include)) and not self.images and self.method == "dowser":
            raise DowserError("--include vision/projector needs image probes: add --images")


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'all', 'last:20', '0-11', '3,5,7' -> sorted layer indices."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    try:
        if spec.startswith("last:"):
            k = int(spec[5:])
            if not 0 < k <= n_layers:
                raise ValueError
            return list(range(n_layers - k, n_layers))
        out = set()
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
            out.update(range(lo_i, hi_i + 1))
    except ValueError:
        raise DowserError(f"--layers {spec!r}: expected all, last:N, A-B or a comma list within 0-{n_layers - 1}") from None
    if not out or min(out) < 0 or max(out) >= n_layers:
        raise DowserError(f"--layers {spec!r}: the model has layers 0-{n_layers - 1}")
    return sorted(out)


def rademacher(seed: int, batch_index: int, draws: int, shape) -> torch.Tensor:
    """The M draws of xi (entries +-1) for one probe batch, reproducible from (seed, batch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch_index + 17)
    return torch.randint(0, 2, (draws, *shape), generator=gen).float().mul_(2).sub_(1)


def resolve_device_dtype(device: str, dtype: str, config: dict) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DowserError("--device cuda: no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DowserError(f"--device must be auto, cpu or cuda, got {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # under torchrun: this rank's GPU
    if dtype == "auto":
        if dev.type == "cpu":
            return dev, torch.float32  # CPUs lack fast half kernels, and float32 is exact enough to compare
        name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
        return dev, {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.bfloat16)
    try:
        return dev, {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise DowserError(f"--dtype must be auto, bfloat16, float16 or float32, got {dtype!r}") from None


def default_activation_budget() -> int:
    """A quarter of the memory available now (Linux), else 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 4 << 30


def parse_size(text: str) -> int:
    """'512MB', '2GB', '1.5GiB', '1000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise DowserError(f"cannot read size {text!r} (examples: 512MB, 2GB)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def distributed_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ActivationStore:
    """Layer inputs of the probe batches in one pass: in RAM, or spilled to temporary files."""

    def __init__(self, spill: bool):
        import tempfile

        self.spill = spill
        self._items: dict = {}
        self._dir = tempfile.mkdtemp(prefix="dowser-activations-") if spill else None

    def put(self, b: int, i: int, t: torch.Tensor) -> None:
        if self.spill:
            path = f"{self._dir}/{b}-{i}.pt"
            torch.save(t.detach().cpu(), path)
            self._items[(b, i)] = (path, t.device)
        else:
            self._items[(b, i)] = t.detach()

    def get(self, b: int, i: int) -> torch.Tensor:
        item = self._items[(b, i)]
        if self.spill:
            path, device = item
            return torch.load(path, mmap=True, weights_only=True).to(device)
        return item.detach()

    def drop(self, b: int, i: int) -> None:
        item = self._items.pop((b, i), None)
        if self.spill and item is not None:
            Path(item[0]).unlink(missing_ok=True)

    def close(self) -> None:
        self._items.clear()
        if self._dir:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)


class ResumeState:
    """`OUT.resume`: the probe tokens and the statistics of every finished probe batch.

    Written atomically after every pass; `--resume` continues from it and gives a
    sidecar byte-identical to an uninterrupted run. Removed when the sidecar is written.
    """

    def __init__(self, path: Path, fingerprint: dict):
        import hashlib

        self.path = Path(path)
        self.fingerprint = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, tokens, psi: dict, a: dict, done: int) -> None:
        from .outputs import atomic_file
        from .safetensors_format import TORCH_TO_ST, StreamingWriter

        tensors = {"tokens": tokens.long().contiguous()}
        for n in sorted(psi):
            tensors[f"psi/{n}"] = torch.stack(psi[n]).float().contiguous()
            tensors[f"a/{n}"] = torch.stack(a[n]).float().contiguous()
        specs = [(k, TORCH_TO_ST[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
        with atomic_file(self.path) as tmp:
            with StreamingWriter(tmp, specs, {"fingerprint": self.fingerprint, "done": str(done)}) as w:
                for k, t in tensors.items():
                    w.write(k, t)

    def load(self):
        from safetensors import safe_open

        from .safetensors_format import read_header

        meta = read_header(self.path).metadata
        if meta.get("fingerprint") != self.fingerprint:
            raise DowserError(f"{self.path}: resume state is from a run with other settings or another model")
        psi, a = {}, {}
        with safe_open(str(self.path), framework="pt") as f:
            tokens = f.get_tensor("tokens")
            for key in f.keys():
                kind, _, name = key.partition("/")
                if kind in ("psi", "a"):
                    (psi if kind == "psi" else a)[name] = list(f.get_tensor(key))
        return tokens, psi, a, int(meta["done"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class StatsRecorder:
    """Forward hooks on scored linears that turn inputs and output gradients into psi and a."""

    def __init__(self, estimator: str, method: str):
        self.estimator, self.method = estimator, method
        self.psi: dict[str, list[torch.Tensor]] = {}
        self.a: dict[str, list[torch.Tensor]] = {}
        self._draws: dict[str, list[torch.Tensor]] = {}
        self._act: dict[str, torch.Tensor] = {}
        self.unit_activation: set[str] = set()  # boundary rule: projector layers use a = 1

    def attach(self, modules: dict[str, nn.Linear]) -> list:
        handles = []
        for name, module in modules.items():
            handles.append(module.register_forward_hook(self._forward_hook(name)))
        return handles

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            h = inputs[0].detach().float()
            dims = tuple(range(h.dim() - 1))
            if self.method == "wanda":
                self._act[name] = h.pow(2).mean(dims).sqrt()
            else:
                self._act[name] = h.abs().mean(dims)
            if output.requires_grad:
                output.register_hook(self._grad_hook(name))

        return hook

    def _grad_hook(self, name: str):
        def hook(g):
            g = g.detach().float()
            dims = tuple(range(g.dim() - 1))
            per_draw = g.pow(2).mean(dims) if self.estimator == "hutchinson" else g.abs().mean(dims)
            self._draws.setdefault(name, []).append(per_draw)

        return hook

    def finish_update(self, names, out_features: dict[str, int]) -> None:
        """Close one update (probe batch): average the draws, store psi_u and a_u."""
        for name in names:
            draws = self._draws.pop(name, None)
            if self.method == "wanda":
                psi = torch.ones(out_features[name])
            elif draws is None:  # no gradient reached it (e.g. vision layers after the feature layer)
                psi = torch.zeros(out_features[name])
            else:
                psi = torch.stack(draws).mean(0)
                if self.estimator == "hutchinson":
                    psi = psi.sqrt()
            a = self._act.pop(name)
            if name in self.unit_activation:
                a = torch.ones_like(a)
            self.psi.setdefault(name, []).append(psi.cpu())
            self.a.setdefault(name, []).append(a.cpu())


class ProbeRun:
    """One probe of one checkpoint (kept as an object so tests can reach the statistics)."""

    def __init__(self, ckpt: Checkpoint, settings: ProbeSettings, progress: bool = True):
        settings.validate()
        self.ckpt, self.s, self.progress = ckpt, settings, progress
        self.device, self.dtype = resolve_device_dtype(settings.device, settings.dtype, ckpt.config or {})
        weights_bytes = sum(math.prod(ckpt.shape(n)) * 4 for n in ckpt.tensor_names())
        resident = {"always": True, "never": False}.get(settings.resident, weights_bytes < (1 << 30))
        self.runner = BlockRunner(ckpt, self.device, self.dtype, resident=resident)
        n_layers = len(self.runner.layers)
        self.layers = parse_layers(settings.layers, n_layers)
        self.scored = scored_names(self.runner.names, self.layers, settings.include, self.runner.is_linear)
        if not self.scored:
            raise DowserError(f"{ckpt.where}: nothing to score with --layers {settings.layers} --include {settings.include}")
        # Where each scored weight sits, computed once for every pass.
        prefix = self.runner.arch.layers
        self.by_layer = {i: [n for n in self.scored if n.startswith(f"{prefix}.{i}.")] for i in range(n_layers)}
        self.stem_scored = [n for n in self.scored if self.runner.block_of(n) in ("vision", "projector")]
        self.out_features = {n: self.runner.model.get_parameter(n).shape[0] for n in self.scored}
        self.tokens: torch.Tensor | None = None
        self.update_weights: list[float] = []
        self.timings: dict[str, float] = {}
        self.activation_budget = settings.activation_budget or default_activation_budget()
        self.spill = False
        self.passes = 0
        self.rank, self.world = distributed_rank_world()

    def _bar(self, total, desc):
        return tqdm(total=total, desc=desc, unit="step", disable=not self.progress, leave=False)

    # ---- probes --------------------------------------------------------
    def make_tokens(self) -> torch.Tensor:
        if self.world > 1:  # rank 0 generates, every rank probes the same sequences
            import torch.distributed as dist

            tokens = self._make_tokens() if self.rank == 0 else None
            box = [tokens]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return self._make_tokens()

    def _make_tokens(self) -> torch.Tensor:
        s = self.s
        if s.probe_file:
            tokens = load_probe_file(s.probe_file)
            vocab = self.runner.model.get_input_embeddings().num_embeddings
            if int(tokens.max()) >= vocab:
                raise DowserError(f"{s.probe_file}: token id {int(tokens.max())} is outside the vocabulary ({vocab})")
            return tokens
        t0 = time.perf_counter()
        with self._bar(s.probe_len - 1, "generating probes") as bar:
            tokens = generate_text_probes(self.runner, s.probes, s.probe_len, s.seed, s.sampling, bar)
        self.timings["generate_s"] = time.perf_counter() - t0
        return tokens

    def batches(self):
        k, bs = self.tokens.shape[0], self.s.batch_size
        return [(b, slice(i, min(i + bs, k))) for b, i in enumerate(range(0, k, bs))]

    def _inputs(self, rows: slice) -> dict:
        ids = self.tokens[rows]
        inputs = {"use_cache": False}
        if self.s.images:
            pixels, token, n = self.images
            ids = torch.cat([torch.full((ids.shape[0], n), token, dtype=ids.dtype), ids], dim=1)
            inputs["pixel_values"] = pixels[rows].to(self.device, self.dtype)
        inputs["input_ids"] = ids.to(self.device)
        return inputs

    # ---- the statistics ------------------------------------------------
    def collect(self, state: "ResumeState | None" = None) -> StatsRecorder:
        """Statistics for every probe batch, in passes of as many batches as the activation
        budget holds; after each pass the statistics so far go to `state` (for --resume)."""
        s, runner = self.s, self.runner
        rec = StatsRecorder(s.estimator, s.method)
        done = 0
        if state is not None and state.exists():
            self.tokens, rec.psi, rec.a, done = state.load()
        else:
            self.tokens = self.make_tokens()
            if state is not None:
                state.save(self.tokens, rec.psi, rec.a, 0)
        if s.images:
            self.images = image_probe(self.ckpt, self.ckpt.config, self.tokens.shape[0], s.seed)
        batches = self.batches()
        self.update_weights = [float(r.stop - r.start) for _, r in batches]
        per_pass = self.batches_per_pass()
        mine = [bt for bt in batches if bt[0] % self.world == self.rank]
        t0 = time.perf_counter()
        todo = [bt for bt in mine if bt[0] >= done]
        self.passes = 0
        for k in range(0, len(todo), per_pass):
            chunk = todo[k : k + per_pass]
            self._collect_pass(rec, chunk)
            self.passes += 1
            if state is not None and self.world == 1:
                state.save(self.tokens, rec.psi, rec.a, chunk[-1][0] + 1)
        self.timings["probe_s"] = time.perf_counter() - t0
        if self.world > 1:
            self._gather(rec, batches)
        return rec

    def batches_per_pass(self) -> int:
        """How many probe batches' layer inputs fit the activation budget at once (at least 1)."""
        cfg = self.runner.model.config.get_text_config()
        k, t = self.tokens.shape
        t += self.images[2] if self.s.images else 0
        per_batch = (len(self.runner.layers) + 1) * self.s.batch_size * t * cfg.hidden_size
        per_batch *= torch.empty((), dtype=self.dtype).element_size()
        self.spill = per_batch > self.activation_budget
        return max(1, min(math.ceil(k / self.s.batch_size), self.activation_budget // max(per_batch, 1)))

    def _collect_pass(self, rec: StatsRecorder, batches) -> None:
        """One streamed pass (forward, head, backward, stem) over a group of probe batches."""
        s, runner = self.s, self.runner
        n_layers = len(runner.layers)
        by_layer, stem_scored, out_features = self.by_layer, self.stem_scored, self.out_features
        rec.unit_activation = {n for n in stem_scored if runner.block_of(n) == "projector"}
        needs_grad = s.method == "dowser"
        store = ActivationStore(spill=self.spill)
        try:
            # 1. layer-0 inputs (embedding stage; vision tower for images)
            with torch.no_grad():
                captured = {b: runner.capture(**self._inputs(rows)) for b, rows in batches}
            for b, _ in batches:
                store.put(b, 0, captured[b].hidden)
                captured[b].hidden = None

            # 2. forward: each layer once for the whole group; keep every layer's input
            last = n_layers if needs_grad or "lm_head" in s.include else max(self.layers) + 1
            with torch.no_grad(), self._bar(last, "forward") as bar:
                for i, layer in runner.stream(range(last)):
                    handles = [] if needs_grad else rec.attach(self._modules(by_layer[i]))
                    for b, _ in batches:
                        store.put(b, i + 1, captured[b].call(layer, store.get(b, i)))
                        if not needs_grad:
                            rec.finish_update(by_layer[i], out_features)
                    for h in handles:
                        h.remove()
                    bar.update(1)
            self._head_stats(rec, store, batches, out_features)
            if not needs_grad:  # wanda: forward statistics only
                return

            # 3. head: M Rademacher draws of the last-position logits -> gradients at the top
            grads = {}
            for b, _ in batches:
                top = store.get(b, n_layers).requires_grad_(True)
                with torch.enable_grad():
                    logits = runner.head_logits(top)
                    xi = rademacher(s.seed, b, s.draws, logits.shape).to(logits.device, logits.dtype)
                    grads[b] = [
                        torch.autograd.grad((xi[d] * logits).sum() / logits.shape[0], top,
                                            retain_graph=d < s.draws - 1)[0]
                        for d in range(s.draws)
                    ]
                store.drop(b, n_layers)

            # 4. backward, layer by layer in reverse; one recomputed forward per batch serves all M draws
            lowest = 0 if stem_scored else min(self.layers)
            with self._bar(n_layers - lowest, "backward") as bar:
                for i, layer in runner.stream(reversed(range(lowest, n_layers))):
                    handles = rec.attach(self._modules(by_layer[i]))
                    with torch.enable_grad():
                        for b, _ in batches:
                            x = store.get(b, i).requires_grad_(True)
                            y = captured[b].call(layer, x)
                            grads[b] = [
                                torch.autograd.grad(y, x, grads[b][d], retain_graph=d < s.draws - 1)[0]
                                for d in range(s.draws)
                            ]
                            if by_layer[i]:
                                rec.finish_update(by_layer[i], out_features)
                            store.drop(b, i)
                    for h in handles:
                        h.remove()
                    bar.update(1)

            # 5. the stem (vision tower, projector), recomputed with gradients from the pixels
            if stem_scored:
                handles = rec.attach(self._modules(stem_scored))
                for b, rows in batches:
                    inputs = self._inputs(rows)
                    pixels = inputs["pixel_values"].requires_grad_(True)
                    with torch.enable_grad():
                        h0 = runner.capture(**inputs).hidden
                        for d in range(s.draws):
                            torch.autograd.grad(h0, pixels, grads[b][d], retain_graph=d < s.draws - 1)
                    rec.finish_update(stem_scored, out_features)
                for h in handles:
                    h.remove()
        finally:
            store.close()

    def _gather(self, rec: StatsRecorder, batches) -> None:
        """Each rank holds its own batches' updates; sum zero-padded (U, n) tables across ranks
        (adding zeros is exact) and keep every update in batch order, as one process would."""
        import torch.distributed as dist

        mine = [b for b, _ in batches if b % self.world == self.rank]
        for n in self.scored:
            out_f, in_f = self.runner.model.get_parameter(n).shape
            for table, width in ((rec.psi, out_f), (rec.a, in_f)):
                rows = table.get(n, [])
                full = torch.zeros(len(batches), width)
                for b, row in zip(mine, rows):
                    full[b] = row
                dist.all_reduce(full)
                table[n] = list(full)

    def _head_stats(self, rec, store, batches, out_features):
        """lm_head: psi = 1 (the output boundary), a = mean |final_norm(h)| over all tokens."""
        head_w = f"{self.runner.arch.head}.weight"
        if head_w not in self.scored:
            return
        with torch.no_grad():
            for b, _ in batches:
                h = self.runner.final_norm(store.get(b, len(self.runner.layers))).float()
                dims = tuple(range(h.dim() - 1))
                a = h.pow(2).mean(dims).sqrt() if self.s.method == "wanda" else h.abs().mean(dims)
                rec.psi.setdefault(head_w, []).append(torch.ones(out_features[head_w]))
                rec.a.setdefault(head_w, []).append(a.cpu())

    def _modules(self, names) -> dict[str, nn.Linear]:
        return {n: self.runner.model.get_submodule(n.rpartition(".")[0]) for n in names}

    # ---- masks and the sidecar ----------------------------------------
    def run(self, state: "ResumeState | None" = None) -> SidecarData:
        s, runner = self.s, self.runner
        psi, a, w = {}, {}, None
        if s.method in ("dowser", "wanda"):
            rec = self.collect(state)
            w = torch.tensor(self.update_weights)
            psi = {n: torch.stack(rec.psi[n]) for n in self.scored}
            a = {n: torch.stack(rec.a[n]) for n in self.scored}
        elif s.method == "magnitude":
            w = torch.ones(1)
            for n in self.scored:
                out_f, in_f = runner.model.get_parameter(n).shape
                psi[n], a[n] = torch.ones(1, out_f), torch.ones(1, in_f)
        masks = {}
        t0 = time.perf_counter()
        for idx, n in enumerate(tqdm(self.scored, desc="cutting masks", disable=not self.progress, leave=False)):
            ckpt_name = runner.checkpoint_name(n)
            W = self.ckpt.read(ckpt_name)
            if s.method == "random":
                gen = torch.Generator().manual_seed(s.seed * 1_000_003 + idx)
                score = torch.rand(W.shape, generator=gen)
            else:
                score = score_matrix(W, psi[n], a[n], w)
            masks[ckpt_name] = PackedMask.of(cut_mask(score, s.update_ratio))
            del W, score
            trim_heap()
        self.timings["mask_s"] = time.perf_counter() - t0
        # The head's mask is stored under the tensor the head computes with (the embedding's name
        # when tied): record its role, so merge and protect find the head whatever FT does with the tie.
        head = role_tensors(self.ckpt.config, self.ckpt.tensor_names(), self.ckpt.where).head
        roles = {head: OUTPUT_HEAD} if "lm_head" in s.include and head in masks else {}
        keep_stats = s.save_stats and bool(psi)
        ckpt_psi = {runner.checkpoint_name(n): v for n, v in psi.items()} if keep_stats else {}
        ckpt_a = {runner.checkpoint_name(n): v for n, v in a.items()} if keep_stats else {}
        return SidecarData(
            masks=masks,
            psi=ckpt_psi,
            a=ckpt_a,
            update_weights=w if keep_stats else None,
            probe_tokens=self.tokens,
            info=self.info(),
            roles=roles,
        )

    def info(self) -> dict:
        s = self.s
        source = s.probe_file or ("self-generated" if s.method in ("dowser", "wanda") else "none")
        base_id = str(Path(self.ckpt.source).resolve()) if not self.ckpt.is_remote and self.ckpt.sha is None else self.ckpt.source
        return {
            "base_model": {"id": base_id, "revision": self.ckpt.revision, "sha": self.ckpt.sha},
            "architecture": self.ckpt.config.get("model_type"),
            "method": s.method,
            "estimator": s.estimator if s.method == "dowser" else None,
            "update_ratio": s.update_ratio,
            "granularity": "entry",
            "layers": self.layers,
            "include": sorted(s.include),
            "probe": {
                "count": None if self.tokens is None else int(self.tokens.shape[0]),
                "length": None if self.tokens is None else int(self.tokens.shape[1]),
                "batch_size": s.batch_size,
                "draws": s.draws if s.method == "dowser" else 0,
                "seed": s.seed,
                "images": s.images,
                "source": source,
                "sampling": asdict(s.sampling),
                "compute_dtype": str(self.dtype).replace("torch.", ""),
            },
        }


def init_distributed(device: str) -> None:
    """Join the torchrun process group when launched with several processes (gloo on CPU, nccl on GPU)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")


def probe(model: str, out: str | None = None, *, revision: str | None = None, settings: ProbeSettings | None = None,
          force: bool = False, resume: bool = False, allow_pickle: bool = False, download: bool = False,
          progress: bool = True) -> dict:
    """Probe `model` (folder or Hub id) and write its sidecar; returns a summary dict.

    Under torchrun the probe batches are split across processes and rank 0 writes.
    """
    from .outputs import check_destination

    settings = settings or ProbeSettings()
    settings.validate()
    init_distributed(settings.device)
    rank, world = distributed_rank_world()
    dest = Path(out or default_sidecar_name(model))
    state_path = dest.with_name(dest.name + ".resume")
    if resume and not state_path.is_file():
        raise DowserError(f"{state_path}: nothing to resume (no state file from an interrupted run)")
    if not resume and state_path.is_file() and not force:
        raise DowserError(f"{state_path}: an interrupted run left this state: pass --resume to continue it, "
                          "or --force to start over")
    dest = check_destination(dest, force or resume, inputs=[model])
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model, revision, allow_pickle=allow_pickle, download=download)
    run = ProbeRun(ckpt, settings, progress and rank == 0)
    identity = [ckpt.source, ckpt.sha, sorted((n, list(ckpt.shape(n))) for n in ckpt.tensor_names())]
    state = ResumeState(state_path, {"settings": settings.fingerprint(), "model": identity}) if world == 1 else None
    if state is not None and not resume:
        state.remove()
    data = run.run(state)
    if rank == 0:
        write_sidecar(dest, data)
    if state is not None:
        state.remove()
    numel = sum(m.numel() for m in data.masks.values())
    protected = sum(m.protected() for m in data.masks.values())
    return {
        "path": str(dest),
        "rank": rank,
        "world": world,
        "tensors": len(data.masks),
        "weights": numel,
        "protected_fraction": protected / numel,
        "probes": None if data.probe_tokens is None else list(data.probe_tokens.shape),
        "seconds": time.perf_counter() - t0,
        "timings": run.timings,
        "passes": run.passes,
        "spilled": run.spill,
        "read_s": run.runner.read_seconds,
        "wait_s": run.runner.wait_seconds,
        "bytes_read": ckpt.bytes_read,
        "sha": ckpt.sha,
    }
