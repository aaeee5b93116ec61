"""`dowser probe`: stream a checkpoint, collect Dowser statistics, cut masks, write the sidecar.

For every probe batch b (one *update*), each scored linear layer records
- a_b: mean over batch and tokens of |h| (its input), and
- psi_b: from g = d(xi . f / B)/dz, the gradient of M Rademacher-weighted
  last-position logits f w.r.t. its output z: mean over draws of mean |g|
  (`reference`, as the published scripts) or sqrt(mean over draws of mean g^2)
  (`hutchinson`, the paper's E[g^2] = ||J||^2).
The score of a matrix is |W| (.) sum_b B_b psi_b a_b^T / sum_b B_b (scoring.py).

Schedule (docs/ARCHITECTURE.md, batched over probe batches so each layer is read
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
from tqdm.auto import tqdm

from ..model.anatomy import Weight
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..errors import DowserError
from .prompts import ImageProbe, Sampling, generate_text_probes, image_processor, load_probe_file
from ..score import cut_mask, score_matrix, validate_ratio
from ..sidecar.file import (OUTPUT_HEAD, MaskSpill, PackedMask, SidecarData, default_sidecar_name, weight_fingerprint, write_sidecar)
from .statistics import StatsRecorder
from ..model.streaming import BlockRunner, trim_heap

METHODS = ("dowser", "magnitude", "wanda", "random")
ESTIMATORS = ("reference", "hutchinson")
INCLUDES = ("lm_head", "projector", "vision", "router")


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
    resident: str = "auto"  # keep layers in memory between uses: auto (if they fit), always, never
    cache_dir: str | None = None  # parent of the temporary layer cache for Hub checkpoints (default: cwd)
    activation_budget: int | None = None  # bytes of stored layer inputs per pass; None: 1/4 of free RAM
    sampling: Sampling = field(default_factory=Sampling)

    def fingerprint(self) -> dict:
        """The settings that decide the result (a resumed run must match them exactly)."""
        d = asdict(self)
        for k in ("device", "resident", "activation_budget", "cache_dir"):
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
        from ..io.outputs import atomic_file
        from ..io.layout import TORCH_TO_ST, StreamingWriter

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

        from ..io.layout import read_header

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


class ProbeRun:
    """One probe of one checkpoint (kept as an object so tests can reach the statistics).

    `weights` lists what is scored (anatomy.Weight, by checkpoint key); `unscored` says
    which candidate tensors are left out and why.
    """

    def __init__(self, ckpt: Checkpoint, settings: ProbeSettings, progress: bool = True, spill_dir=None):
        settings.validate()
        self.ckpt, self.s, self.progress = ckpt, settings, progress
        self.device, self.dtype = resolve_device_dtype(settings.device, settings.dtype, ckpt.config or {})
        if settings.resident not in ("auto", "always", "never"):
            raise DowserError(f"--resident must be auto, always or never, got {settings.resident!r}")
        self.runner = BlockRunner(ckpt, self.device, self.dtype, residency=settings.resident,
                                  cache_dir=settings.cache_dir)
        self.anatomy = self.runner.anatomy
        if settings.images and (self.anatomy.prefix or self.anatomy.vision_encoder is None):
            why = ("its LLM is probed with text only, as in the published runs" if self.anatomy.prefix
                   else "the model has no vision tower")
            raise DowserError(f"{ckpt.where}: --images does not apply: {why}")
        n_layers = len(self.runner.layers)
        self.layers = parse_layers(settings.layers, n_layers)
        self.unscored: dict[str, str] = {}
        self.by_layer = {i: self._decoder_weights(i) if i in self.layers else [] for i in range(n_layers)}
        self.head_weights = [self.anatomy.head_weight()] if "lm_head" in settings.include else []
        if self.head_weights == [None]:
            raise DowserError(f"{ckpt.where}: --include lm_head, but the model has no output head")
        self.stem_weights = [w for part in ("projector", "vision") if part in settings.include
                             for w in self.anatomy.stem_weights(part)]
        self.images = None
        self.weights: list[Weight] = [w for i in range(n_layers) for w in self.by_layer[i]]
        self.weights += self.head_weights + self.stem_weights
        if not self.weights:
            raise DowserError(f"{ckpt.where}: nothing to score with --layers {settings.layers} --include {settings.include}")
        self.sizes = {w.key: _out_in(w, self.anatomy.shapes[w.key]) for w in self.weights}
        self.tokens: torch.Tensor | None = None
        self.cut_early: dict = {}  # masks cut in the last pass, by checkpoint key
        self.fingerprints: dict[str, str] = {}  # weight_fingerprint of each scored tensor, by checkpoint key
        self.mask_spill = MaskSpill(spill_dir)  # packed masks on disk until the sidecar is written
        self.update_weights: list[float] = []
        self.timings: dict[str, float] = {}
        self.activation_budget = settings.activation_budget or default_activation_budget()
        self.spill = False
        self.passes = 0
        self.rank, self.world = distributed_rank_world()

    def _decoder_weights(self, i: int) -> list[Weight]:
        out = []
        for w in self.anatomy.decoder_weights(i):
            if w.kind == "router" and "router" not in self.s.include:
                self.unscored[w.key] = "router (scored with --include router)"
                continue
            out.append(w)
        for key in self.anatomy.unscorable(i):
            self.unscored[key] = "fused 3-D expert tensor on disk: its per-expert activations cannot be recorded"
        return out

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
        if self.s.images:
            inputs = self.images.inputs(rows, ids)
        else:
            inputs = {"input_ids": ids}
        inputs["use_cache"] = False
        return {k: (v.to(self.device, self.dtype) if torch.is_tensor(v) and v.is_floating_point()
                    else v.to(self.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}

    # ---- the statistics ------------------------------------------------
    def collect(self, state: "ResumeState | None" = None) -> StatsRecorder:
        """Statistics for every probe batch, in passes of as many batches as the activation
        budget holds; after each pass the statistics so far go to `state` (for --resume)."""
        s = self.s
        rec = self._recorder()
        done = 0
        images = image_processor(self.ckpt) if s.images else None  # before generating: fail fast
        if state is not None and state.exists():
            self.tokens, rec.psi, rec.a, done = state.load()
        else:
            self.tokens = self.make_tokens()
            if state is not None:
                state.save(self.tokens, rec.psi, rec.a, 0)
        if s.images:
            processor, prompt, side = images
            self.images = ImageProbe(processor, prompt, self.tokens.shape[0], s.seed, side, self.ckpt.where)
        self._trace_calls()
        batches = self.batches()
        self.update_weights = [float(r.stop - r.start) for _, r in batches]
        per_pass = self.batches_per_pass()
        mine = [bt for bt in batches if bt[0] % self.world == self.rank]
        t0 = time.perf_counter()
        todo = [bt for bt in mine if bt[0] >= done]
        self.passes = 0
        for k in range(0, len(todo), per_pass):
            chunk = todo[k : k + per_pass]
            # In the last pass every layer's statistics complete while its weights are loaded: its masks
            # are cut then, so the weights are not read once more (one process: ranks gather at the end).
            self._collect_pass(rec, chunk, final=k + per_pass >= len(todo) and self.world == 1)
            self.passes += 1
            if state is not None and self.world == 1:
                state.save(self.tokens, rec.psi, rec.a, chunk[-1][0] + 1)
        self.timings["probe_s"] = time.perf_counter() - t0
        if self.world > 1:
            self._gather(rec, batches)
        return rec

    def _recorder(self) -> StatsRecorder:
        rec = StatsRecorder(self.s.estimator, self.s.method)
        rec.sizes = self.sizes
        rec.unit_activation = {w.key for w in self.stem_weights if w.part == "projector"}
        return rec

    def _trace_calls(self) -> None:
        """One stem forward (and backward, with images) on the first batch, before any statistics
        (data-free):
        - which decoder layers the model does not call for these probes (not scored);
        - which tensor arguments of the decoder layers besides the hidden states the image reaches
          (side inputs such as Mllama's cross-attention states): the reverse pass differentiates
          through them too, so the weights that read them get sensitivities;
        - which vision and projector weights cannot influence the output (layers after the selected
          feature layer, unused heads): they are not scored, and the sidecar says why."""
        self.side_inputs: dict[int, list] = {}
        inputs = self._inputs(slice(0, 1))
        with torch.no_grad():  # also settles the one-off check of inter-layer terms before hooks record
            calls = self.runner.capture(**inputs).calls
        self._drop_uncalled(calls)
        if self.images is None:
            return
        outputs: dict[str, torch.Tensor] = {}
        modules = {w.module for w in self.stem_weights}
        hooks = [self.runner.model.get_submodule(m).register_forward_hook(
            lambda mod, inp, out, m=m: outputs.__setitem__(m, out)) for m in modules]
        try:
            with torch.enable_grad():
                for v in inputs.values():
                    if torch.is_tensor(v) and v.is_floating_point():
                        v.requires_grad_(True)
                cap = self.runner.capture(grad=True, **inputs)
                for i, c in enumerate(cap.calls):
                    keys = [k for k in (c.tensor_keys() if c is not None else []) if c.get(k).requires_grad]
                    if keys:
                        self.side_inputs[i] = keys
                ends = [cap.hidden] + [t for _, t in self._stem_ends(cap)]
                ends = [e for e in ends if e.requires_grad]
                names = [m for m in modules if m in outputs and outputs[m].requires_grad]
                grads = torch.autograd.grad(sum(e.float().sum() for e in ends), [outputs[m] for m in names],
                                            allow_unused=True) if ends and names else []
        finally:
            for h in hooks:
                h.remove()
        reached = {m for m, g in zip(names, grads) if g is not None}
        kept = []
        for w in self.stem_weights:
            if w.module in reached:
                kept.append(w)
            else:
                self.unscored[w.key] = "cannot influence the output (after the selected vision feature layer, or unused)"
        dropped = {w.key for w in self.stem_weights} - {w.key for w in kept}
        self.stem_weights = kept
        self.weights = [w for w in self.weights if w.key not in dropped]

    def _drop_uncalled(self, calls) -> None:
        """Decoder layers the model does not call for these probes (Mllama's cross-attention layers
        without images) cannot influence the output: their weights are not scored."""
        for i, call in enumerate(calls):
            if call is None and self.by_layer.get(i):
                for w in self.by_layer[i]:
                    self.unscored[w.key] = "the model does not call this layer for these probes (e.g. cross-attention without images)"
                dropped = {w.key for w in self.by_layer[i]}
                self.by_layer[i] = []
                self.weights = [w for w in self.weights if w.key not in dropped]

    def _stem_ends(self, cap) -> list[tuple[tuple, torch.Tensor]]:
        """Where the stem's output enters the decoder besides the layer-0 hidden states, by position:
        (('delta', i), term added after layer i) and (('side', i, key), side input of layer i)."""
        ends = []
        for i, c in enumerate(cap.calls):
            if c is None:
                continue
            if c.delta is not None:
                ends.append((("delta", i), c.delta))
            ends += [(("side", i, k), c.get(k)) for k in self.side_inputs.get(i, [])]
        return ends

    def batches_per_pass(self) -> int:
        """How many probe batches' layer inputs fit the activation budget at once (at least 1)."""
        k, t = self.tokens.shape
        t += self.images.extra_tokens if self.images is not None else 0
        hidden = self.anatomy.text_config.hidden_size
        per_batch = (len(self.runner.layers) + 1) * self.s.batch_size * t * hidden
        per_batch *= torch.empty((), dtype=self.dtype).element_size()
        self.spill = per_batch > self.activation_budget
        return max(1, min(math.ceil(k / self.s.batch_size), self.activation_budget // max(per_batch, 1)))

    def _collect_pass(self, rec: StatsRecorder, batches, final: bool = False) -> None:
        """One streamed pass (forward, head, backward, stem) over a group of probe batches; in the
        `final` pass each layer's masks are cut while its weights are loaded."""
        s, runner = self.s, self.runner
        n_layers = len(runner.layers)
        by_layer = self.by_layer
        needs_grad = s.method == "dowser"
        store = ActivationStore(spill=self.spill)
        try:
            # 1. what every layer is called with (embedding stage; vision tower for images)
            with torch.no_grad():
                captured = {b: runner.capture(**self._inputs(rows)) for b, rows in batches}
            for b, _ in batches:
                store.put(b, 0, captured[b].hidden)
                captured[b].hidden = None

            # 2. forward: each layer once for the whole group; keep every layer's input
            last = n_layers if needs_grad or self.head_weights else max(self.layers) + 1
            with torch.no_grad(), self._bar(last, "forward") as bar:
                for i, layer in runner.stream(range(last)):
                    handles = [] if needs_grad else rec.attach(by_layer[i], runner.model)
                    for b, _ in batches:
                        store.put(b, i + 1, captured[b].call(i, layer, store.get(b, i), runner.tuple_out))
                        if not needs_grad:
                            rec.finish_update(by_layer[i])
                    for h in handles:
                        h.remove()
                    if final and not needs_grad:
                        self._cut_loaded(by_layer[i], rec)
                    bar.update(1)
            self._head_stats(rec, store, batches)
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

            # 4. backward, layer by layer in reverse; one recomputed forward per batch serves all M draws.
            # What the stem feeds in besides the layer-0 hidden states (a term added after layer i, a side
            # input such as cross-attention states) gets its gradient here, for the stem's own backward.
            end_grads = {b: {} for b, _ in batches}
            lowest = 0 if self.stem_weights else min(self.layers)
            with self._bar(n_layers - lowest, "backward") as bar:
                for i, layer in runner.stream(reversed(range(lowest, n_layers))):
                    handles = rec.attach(by_layer[i], runner.model)
                    with torch.enable_grad():
                        for b, _ in batches:
                            call = captured[b].calls[i]
                            if call is not None:
                                if call.delta is not None:
                                    end_grads[b][("delta", i)] = grads[b]
                                grads[b] = self._layer_backward(i, layer, call, captured[b], store.get(b, i),
                                                                grads[b], end_grads[b])
                            if by_layer[i]:
                                rec.finish_update(by_layer[i])
                            store.drop(b, i)
                    for h in handles:
                        h.remove()
                    if final:
                        self._cut_loaded(by_layer[i], rec)
                    bar.update(1)

            # 5. the stem (vision tower, projector), recomputed with gradients into the pixels
            if self.stem_weights:
                self._stem_stats(rec, batches, grads, end_grads)
        finally:
            store.close()

    def _layer_backward(self, i, layer, call, captured, x, grads, end_grads) -> list[torch.Tensor]:
        """The M draws' gradients at layer i's input, from those at its output: one recomputed forward,
        gradients with respect to the input (and the layer's side inputs) only, never the weights."""
        draws = self.s.draws
        keys = self.side_inputs.get(i, [])
        side = {k: call.get(k).detach().requires_grad_(True) for k in keys}
        x = x.requires_grad_(True)
        y = captured.call(i, layer, x, self.runner.tuple_out, side)
        wrt = [x] + list(side.values())
        out = []
        for d in range(draws):
            g = torch.autograd.grad(y, wrt, grads[d], retain_graph=d < draws - 1, allow_unused=True)
            out.append(g[0])
            for k, gk, t in zip(keys, g[1:], side.values()):
                end_grads.setdefault(("side", i, k), [None] * draws)[d] = torch.zeros_like(t) if gk is None else gk
        return out

    def _loaded_weight(self, w: Weight) -> torch.Tensor | None:
        """The checkpoint tensor of `w`, bit for bit, from the parameter loaded now; None if it is not
        loaded or the compute dtype cannot hold the stored values exactly (e.g. float32 stored,
        bfloat16 computed): it is then read again from the checkpoint."""
        p = self.runner.model.get_parameter(w.param)
        stored = self.ckpt.dtype(w.key)
        if p.device.type == "meta" or not _holds_exactly(p.dtype, stored):
            return None
        t = p.detach()
        if w.expert is not None:
            t = t[w.expert, w.rows[0]:w.rows[1]]
        return t.to("cpu", stored)

    def _cut_loaded(self, weights: list[Weight], rec: StatsRecorder) -> None:
        """Cut the masks of weights whose statistics are complete, from their loaded values."""
        for x in weights:
            W = self._loaded_weight(x)
            if W is not None:
                psi, a = torch.stack(rec.psi[x.key]), torch.stack(rec.a[x.key])
                self.cut_early[x.key] = self._cut(x, W, psi, a, torch.tensor(self.update_weights))

    def _cut(self, x: Weight, W: torch.Tensor, psi, a, w):
        """x's mask, cut from its weight (as stored) and statistics, bit-packed into the spill file."""
        if x.expert is None:  # a whole stored tensor: merge checks BASE against it
            self.fingerprints[x.key] = weight_fingerprint(W)
        score = score_matrix(W, psi, a, w, transposed=x.transposed)
        mask = self.mask_spill.add(PackedMask.of(cut_mask(score, self.s.update_ratio)))
        del score
        trim_heap()
        return mask

    def _stem_stats(self, rec: StatsRecorder, batches, grads, end_grads) -> None:
        s, runner = self.s, self.runner
        handles = rec.attach(self.stem_weights, runner.model)
        try:
            for b, rows in batches:
                inputs = self._inputs(rows)
                leaves = [v.requires_grad_(True) for v in inputs.values() if torch.is_tensor(v) and v.is_floating_point()]
                with torch.enable_grad():
                    cap = runner.capture(grad=True, **inputs)
                    ends = [(cap.hidden, grads[b])] + [(t, end_grads[b][pos]) for pos, t in self._stem_ends(cap)
                                                       if pos in end_grads[b]]
                    ends = [(e, g) for e, g in ends if e.requires_grad]
                    for d in range(s.draws):
                        torch.autograd.grad([e for e, _ in ends], leaves, [g[d] for _, g in ends],
                                            retain_graph=d < s.draws - 1, allow_unused=True)
                rec.finish_update(self.stem_weights)
        finally:
            for h in handles:
                h.remove()

    def _gather(self, rec: StatsRecorder, batches) -> None:
        """Each rank holds its own batches' updates; sum zero-padded (U, n) tables across ranks
        (adding zeros is exact) and keep every update in batch order, as one process would."""
        import torch.distributed as dist

        mine = [b for b, _ in batches if b % self.world == self.rank]
        for w in self.weights:
            out_f, in_f = self.sizes[w.key]
            for table, width in ((rec.psi, out_f), (rec.a, in_f)):
                rows = table.get(w.key, [])
                full = torch.zeros(len(batches), width)
                for b, row in zip(mine, rows):
                    full[b] = row
                dist.all_reduce(full)
                table[w.key] = list(full)

    def _head_stats(self, rec: StatsRecorder, store, batches) -> None:
        """lm_head: psi = 1 (the output boundary), a = mean |its input| over all tokens, from
        the model's own post-decoder computation."""
        if not self.head_weights:
            return
        w = self.head_weights[0]
        head = self.runner.model.get_submodule(w.module)
        for b, _ in batches:
            seen = {}
            handle = head.register_forward_hook(lambda m, inp, out: seen.__setitem__("h", inp[0]))
            try:
                with torch.no_grad():
                    self.runner.head_logits(store.get(b, len(self.runner.layers)), all_positions=True)
            finally:
                handle.remove()
            h = seen["h"].float()
            dims = tuple(range(h.dim() - 1))
            a = h.pow(2).mean(dims).sqrt() if self.s.method == "wanda" else h.abs().mean(dims)
            rec.psi.setdefault(w.key, []).append(torch.ones(self.sizes[w.key][0]))
            rec.a.setdefault(w.key, []).append(a.cpu())

    # ---- masks and the sidecar ----------------------------------------
    def run(self, state: "ResumeState | None" = None) -> SidecarData:
        s = self.s
        psi, a, w = {}, {}, None
        if s.method in ("dowser", "wanda"):
            rec = self.collect(state)
            w = torch.tensor(self.update_weights)
            psi = {x.key: torch.stack(rec.psi[x.key]) for x in self.weights}
            a = {x.key: torch.stack(rec.a[x.key]) for x in self.weights}
        elif s.method == "magnitude":
            w = torch.ones(1)
            for x in self.weights:
                out_f, in_f = self.sizes[x.key]
                psi[x.key], a[x.key] = torch.ones(1, out_f), torch.ones(1, in_f)
        masks = {}
        t0 = time.perf_counter()
        for idx, x in enumerate(tqdm(self.weights, desc="cutting masks", disable=not self.progress, leave=False)):
            if x.key in self.cut_early:  # cut while the layer was loaded in the last pass
                masks[x.key] = self.cut_early[x.key]
                continue
            if s.method == "random":
                gen = torch.Generator().manual_seed(s.seed * 1_000_003 + idx)
                masks[x.key] = self.mask_spill.add(PackedMask.of(cut_mask(torch.rand(self.ckpt.shape(x.key), generator=gen),
                                                                     s.update_ratio)))
                continue
            W = self._loaded_weight(x)  # the stem (lm_head, vision, projector) stays loaded
            W = self.runner.read_raw([x.key])[x.key] if W is None else W
            masks[x.key] = self._cut(x, W, psi[x.key], a[x.key], w)
            del W
        self.timings["mask_s"] = time.perf_counter() - t0
        # The head's mask is stored under the tensor the head computes with (the embedding's name
        # when tied): record its role, so merge and protect find the head whatever FT does with the tie.
        roles = {x.key: OUTPUT_HEAD for x in self.head_weights}
        keep_stats = s.save_stats and bool(psi)
        return SidecarData(
            masks=masks,
            psi=psi if keep_stats else {},
            a=a if keep_stats else {},
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
            "architecture": (self.ckpt.config or {}).get("model_type"),
            "method": s.method,
            "estimator": s.estimator if s.method == "dowser" else None,
            "update_ratio": s.update_ratio,
            "granularity": "entry",
            "layers": self.layers,
            "include": sorted(s.include),
            "tensor_info": {x.key: _tensor_info(x, self.fingerprints.get(x.key)) for x in self.weights},
            "unscored": dict(sorted(self.unscored.items())),
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


def _holds_exactly(compute: torch.dtype, stored: torch.dtype) -> bool:
    """Whether converting `stored` values to `compute` and back gives the same bits."""
    if compute == stored:
        return True
    wider = {torch.float32: (torch.bfloat16, torch.float16), torch.float64: (torch.float32, torch.bfloat16, torch.float16)}
    return stored in wider.get(compute, ())


def _tensor_info(w: Weight, fingerprint: str | None) -> dict:
    """What the sidecar records about one scored tensor (docs/FORMAT.md, `tensor_info`)."""
    info = {"part": w.part, "kind": w.kind, "layer": w.layer, "layout": "in_out" if w.transposed else "out_in"}
    if w.expert is not None:
        info["expert"] = w.expert
    if fingerprint is not None:
        info["fingerprint"] = fingerprint
    return info


def _out_in(w: Weight, shape) -> tuple[int, int]:
    """(out features, in features) of a scored weight from its stored shape."""
    return (shape[1], shape[0]) if w.transposed else (shape[0], shape[1])


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
    from ..io.outputs import check_destination

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
    run = ProbeRun(ckpt, settings, progress and rank == 0, spill_dir=dest.parent)
    try:
        identity = [ckpt.source, ckpt.sha, sorted((n, list(ckpt.shape(n))) for n in ckpt.tensor_names())]
        state = ResumeState(state_path, {"settings": settings.fingerprint(), "model": identity}) if world == 1 else None
        if state is not None and not resume:
            state.remove()
        try:
            data = run.run(state)
        except DowserError:
            if state is not None and not resume:
                state.remove()  # bad input, not an interruption: nothing to resume, no partial output
            raise
        if rank == 0:
            write_sidecar(dest, data)
        if state is not None:
            state.remove()
        numel = sum(m.numel() for m in data.masks.values())
        protected = sum(m.protected() for m in data.masks.values())
    finally:
        run.runner.close()
        run.mask_spill.close()
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
        "weight_passes": run.runner.passes,
        "tier": run.runner.tier,
        "spilled": run.spill,
        "read_s": run.runner.read_seconds,
        "wait_s": run.runner.wait_seconds,
        "bytes_read": ckpt.bytes_read,
        "sha": ckpt.sha,
    }
