"""`dowser probe`: stream a checkpoint, collect Dowser statistics, cut masks, write the sidecar.

For every probe batch b (one *update*), each scored linear layer records
- a_b: mean over batch and tokens of |h| (its input), and
- psi_b: from g = d(xi . f / B)/dz, the gradient of M Rademacher-weighted
  last-position logits f w.r.t. its output z: mean over draws of mean |g|
  (`reference`, as the published scripts) or sqrt(mean over draws of mean g^2)
  (`hutchinson`, the paper's E[g^2] = ||J||^2).
The score of a matrix is |W| (.) sum_b B_b psi_b a_b^T / sum_b B_b (score.py).

Schedule (docs/ARCHITECTURE.md, batched over probe batches so each layer is read
twice per run, not twice per batch): capture layer-0 inputs of every batch;
forward through the layers keeping each layer's input; head + M draws give the
gradients at the top; then layer by layer in reverse, reload the layer,
recompute it once from its stored input with gradients on the input only, and
push the M draws through that one graph. Weight gradients are never formed.

Owns the orchestration: `ProbeRun` (probe tokens and inputs, the loop over passes, the
statistics handed to the cut) and `probe()` (destination, resume, the sidecar, the summary).
What is scored is `settings` and `selection`; how passes are scheduled, `schedule`; what a pass
computes, `passes`; how masks are cut and the run described, `cut`. Their public names are
importable from here too, as before the split.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import DowserError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..model.anatomy import Weight  # noqa: F401  (re-exported: the names of run.py before the split)
from ..model.quant import detect_checkpoint, refuse
from ..model.streaming import BlockRunner
from ..sidecar.file import OUTPUT_HEAD, SidecarData, default_sidecar_name, write_sidecar
from .cut import MaskCutter, _holds_exactly, _tensor_info, gather, probe_info  # noqa: F401
from .passes import PassRunner, progress_bar, rademacher
from .prompts import (ImageProbe, Sampling, decoder_start_id, generate_text_probes, image_processor, load_probe_file,
                      shift_right)
from .schedule import ActivationStore, ResumeState, batches_per_pass, split_batches
from .selection import WeightSelection, _out_in  # noqa: F401
from .settings import (ESTIMATORS, INCLUDES, METHODS, ProbeSettings, default_activation_budget, distributed_rank_world,
                       init_distributed, parse_layers, parse_size, resolve_device_dtype)
from .statistics import StatsRecorder

__all__ = ["ProbeRun", "probe", "ProbeSettings", "parse_layers", "parse_size", "rademacher", "resolve_device_dtype",
           "default_activation_budget", "distributed_rank_world", "init_distributed", "ActivationStore",
           "ResumeState", "METHODS", "ESTIMATORS", "INCLUDES", "Sampling"]


class ProbeRun:
    """One probe of one checkpoint (kept as an object so tests can reach the statistics).

    `weights` lists what is scored (anatomy.Weight, by checkpoint key); `unscored` says
    which candidate tensors are left out and why. The parts: `selection` (WeightSelection: what
    is scored), `pass_runner` (PassRunner: what a pass computes), `cutter` (MaskCutter: the masks).
    """

    def __init__(self, ckpt: Checkpoint, settings: ProbeSettings, progress: bool = True, spill_dir=None):
        settings.validate()
        self.ckpt, self.s, self.progress = ckpt, settings, progress
        quantized = detect_checkpoint(ckpt)
        if quantized is not None:  # its codes are not weights: scoring them would be silently wrong
            raise refuse(quantized, ckpt.where, "probe")
        self.device, self.dtype = resolve_device_dtype(settings.device, settings.dtype, ckpt.config or {})
        if settings.resident not in ("auto", "always", "never"):
            raise DowserError(f"--resident must be auto, always or never, got {settings.resident!r}")
        self.runner = BlockRunner(ckpt, self.device, self.dtype, residency=settings.resident,
                                  cache_dir=settings.cache_dir)
        self.anatomy = self.runner.anatomy
        self.decoder_start = decoder_start_id(self.runner)  # None unless an encoder-decoder
        if settings.images and (self.anatomy.prefix or self.anatomy.vision_encoder is None):
            why = ("its LLM is probed with text only, as in the published runs" if self.anatomy.prefix
                   else "the model has no vision tower")
            raise DowserError(f"{ckpt.where}: --images does not apply: {why}")
        self.selection = WeightSelection(self.anatomy, settings, len(self.runner.layers), ckpt.where)
        self.images = None
        self.tokens: torch.Tensor | None = None
        self.cutter = MaskCutter(ckpt, self.runner, settings, spill_dir)
        self.pass_runner = PassRunner(settings, self.runner, self.selection, self._inputs, progress)
        self.update_weights: list[float] = []
        self.timings: dict[str, float] = {}
        self.activation_budget = settings.activation_budget or default_activation_budget()
        self.spill = False
        self.passes = 0
        self.rank, self.world = distributed_rank_world()

    # What is scored, and what is cut, read through the run as before the split.
    layers = property(lambda self: self.selection.layers)
    by_layer = property(lambda self: self.selection.by_layer)
    weights = property(lambda self: self.selection.weights)
    head_weights = property(lambda self: self.selection.head_weights)
    stem_weights = property(lambda self: self.selection.stem_weights)
    unscored = property(lambda self: self.selection.unscored)
    sizes = property(lambda self: self.selection.sizes)
    side_inputs = property(lambda self: self.pass_runner.side_inputs)
    cut_early = property(lambda self: self.cutter.cut_early)
    fingerprints = property(lambda self: self.cutter.fingerprints)
    mask_spill = property(lambda self: self.cutter.mask_spill)

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
        with progress_bar(self.progress, s.probe_len - 1, "generating probes") as bar:
            tokens = generate_text_probes(self.runner, s.probes, s.probe_len, s.seed, s.sampling, bar)
        self.timings["generate_s"] = time.perf_counter() - t0
        return tokens

    def batches(self):
        return split_batches(self.tokens.shape[0], self.s.batch_size)

    def _inputs(self, rows: slice) -> dict:
        ids = self.tokens[rows]
        if self.s.images:
            inputs = self.images.inputs(rows, ids)
        else:
            inputs = {"input_ids": ids}
        if self.decoder_start is not None:  # an encoder-decoder: its decoder runs over the probe text too
            inputs["decoder_input_ids"] = shift_right(ids, self.decoder_start)
        return self._on_device(inputs)

    def _on_device(self, inputs: dict) -> dict:
        inputs["use_cache"] = False
        return {k: (v.to(self.device, self.dtype) if torch.is_tensor(v) and v.is_floating_point()
                    else v.to(self.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}

    # ---- the statistics ------------------------------------------------
    def collect(self, state: ResumeState | None = None) -> StatsRecorder:
        """Statistics for every probe batch, in passes of as many batches as the activation
        budget holds; after each pass the statistics so far go to `state` (for --resume)."""
        rec = self._recorder()
        done = self._prepare(rec, state)
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
            gather(rec, batches, self.weights, self.sizes, self.rank, self.world)
        return rec

    def _prepare(self, rec: StatsRecorder, state: ResumeState | None) -> int:
        """The probe tokens (generated, read, or those of `state`) and images, then the call trace;
        returns how many probe batches `state` has finished (0 for a new run)."""
        s = self.s
        done = 0
        images = image_processor(self.ckpt) if s.images else None  # before generating: fail fast
        if images is not None:  # the first batch's images through processor and model, in one line if they disagree
            rows = max(1, min(s.batch_size, s.probes))
            trial = ImageProbe(*images[:2], rows, s.seed, images[2], self.ckpt.where)
            trial.check(self.runner, self._on_device(trial.inputs(slice(0, rows), torch.zeros(rows, 0, dtype=torch.long))))
        if state is not None and state.exists():
            self.tokens, rec.psi, rec.a, done = state.load()
        else:
            self.tokens = self.make_tokens()
            if state is not None:
                state.save(self.tokens, rec.psi, rec.a, 0)
        if s.images:
            processor, prompt, side = images
            self.images = ImageProbe(processor, prompt, self.tokens.shape[0], s.seed, side, self.ckpt.where)
            self.images.check(self.runner, self._inputs(self.batches()[0][1]))  # processor vs model, in one line
        self.pass_runner.trace_calls(images=self.images is not None)
        return done

    def _recorder(self) -> StatsRecorder:
        rec = StatsRecorder(self.s.estimator, self.s.method)
        rec.sizes = self.sizes
        rec.unit_activation = {w.key for w in self.stem_weights if w.part == "projector"}
        return rec

    def batches_per_pass(self) -> int:
        """How many probe batches' layer inputs fit the activation budget at once (at least 1)."""
        k, t = self.tokens.shape
        t += self.images.extra_tokens if self.images is not None else 0
        per_pass, self.spill = batches_per_pass(k, t, self.s.batch_size, len(self.runner.layers),
                                                self.anatomy.text_config.hidden_size, self.dtype,
                                                self.activation_budget)
        return per_pass

    def _collect_pass(self, rec: StatsRecorder, batches, final: bool = False) -> None:
        """One streamed pass (forward, head, backward, stem) over a group of probe batches; in the
        `final` pass each layer's masks are cut while its weights are loaded."""
        cut = (lambda weights: self.cutter.cut_loaded(weights, rec, self.update_weights)) if final else None
        self.pass_runner.run(rec, batches, self.spill, on_layer=cut)

    # ---- masks and the sidecar ----------------------------------------
    def run(self, state: ResumeState | None = None) -> SidecarData:
        s = self.s
        psi, a, w = {}, {}, None
        if s.method in ("dowser", "wanda"):
            rec = self.collect(state)
            w = torch.tensor(self.update_weights)
            psi = {x.key: torch.stack(rec.psi[x.key]) for x in self.weights}
            a = {x.key: torch.stack(rec.a[x.key]) for x in self.weights}
            self.selection.note_unreached(psi, a)  # experts of a 3-D stack no probe token reached
        elif s.method == "magnitude":
            w = torch.ones(1)
            for x in self.weights:
                out_f, in_f = self.sizes[x.key]
                psi[x.key], a[x.key] = torch.ones(1, out_f), torch.ones(1, in_f)
        t0 = time.perf_counter()
        masks = self.cutter.cut_all(self.weights, psi, a, w, self.progress)
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
        return probe_info(self.ckpt, self.s, self.selection, self.fingerprints, self.tokens, self.dtype)


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
    state_path = _state_path(dest, resume, force)
    dest = check_destination(dest, force or resume, inputs=[model])
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model, revision, allow_pickle=allow_pickle, download=download)
    run = ProbeRun(ckpt, settings, progress and rank == 0, spill_dir=dest.parent)
    try:
        data = _run_and_write(run, dest, state_path, resume, rank, world)
        numel = sum(m.numel() for m in data.masks.values())
        protected = sum(m.protected() for m in data.masks.values())
    finally:
        run.runner.close()
        run.mask_spill.close()
    return _summary(run, data, dest, rank, world, numel, protected, t0)


def _state_path(dest: Path, resume: bool, force: bool) -> Path:
    """`DEST.resume`, checked: it must exist to resume, and not be overwritten without --force."""
    state_path = dest.with_name(dest.name + ".resume")
    if resume and not state_path.is_file():
        raise DowserError(f"{state_path}: nothing to resume (no state file from an interrupted run)")
    if not resume and state_path.is_file() and not force:
        raise DowserError(f"{state_path}: an interrupted run left this state: pass --resume to continue it, "
                          "or --force to start over")
    return state_path


def _run_and_write(run: ProbeRun, dest: Path, state_path: Path, resume: bool, rank: int, world: int) -> SidecarData:
    """Run the probe (resumable when one process runs it) and write the sidecar on rank 0."""
    ckpt = run.ckpt
    identity = [ckpt.source, ckpt.sha, sorted((n, list(ckpt.shape(n))) for n in ckpt.tensor_names())]
    state = ResumeState(state_path, {"settings": run.s.fingerprint(), "model": identity}) if world == 1 else None
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
    return data


def _summary(run: ProbeRun, data: SidecarData, dest: Path, rank: int, world: int, numel: int, protected: int,
             t0: float) -> dict:
    """What `probe()` returns: where the sidecar went, what it holds, and how the run went."""
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
        "bytes_read": run.ckpt.bytes_read,
        "sha": run.ckpt.sha,
        "unscored": dict(run.unscored),
        "dtype": str(run.dtype).replace("torch.", ""),
        "device": run.device.type,
    }
