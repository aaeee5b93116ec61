"""What one pass computes: the streamed forward through the decoder layers, the head's
Rademacher draws, the backward layer by layer in reverse, the head's and the stem's statistics,
and the call trace that settles which layers and stem weights a pass reaches.

Owns: `rademacher`, `PassRunner`. When passes run, and how many batches each holds, is
`schedule` and `ProbeRun.collect`; cutting masks from the results is `cut`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..errors import DowserError
from .schedule import ActivationStore
from .selection import WeightSelection
from .settings import ProbeSettings
from .statistics import StatsRecorder


def rademacher(seed: int, batch_index: int, draws: int, shape) -> torch.Tensor:
    """The M draws of xi (entries +-1) for one probe batch, reproducible from (seed, batch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch_index + 17)
    return torch.randint(0, 2, (draws, *shape), generator=gen).float().mul_(2).sub_(1)


def progress_bar(progress: bool, total, desc):
    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)


def check_finite(runner, t: torch.Tensor, what: str, layer: int | None) -> None:
    """Refuse, in one line, a pass whose activations or gradients are not finite (an overflow in a
    half dtype: Gemma in float16, transformers#36822): no statistics are recorded from them."""
    if t is None or bool(torch.isfinite(t).all()):
        return
    at = "the output head" if layer is None else f"decoder layer {layer} ({runner.anatomy.layers_path}.{layer})"
    dtype = str(t.dtype).replace("torch.", "")
    remedy = ("probe with --dtype float32, or bfloat16, which has float32's range" if dtype == "float16"
              else "probe with --dtype float32")
    raise DowserError(f"{runner.ckpt.where}: non-finite {what} at {at} computing in {dtype} "
                      f"(the values overflow it); {remedy}")


def token_side_inputs(runner, inputs: dict) -> dict[int, list]:
    """Tensor arguments of the decoder layers, besides the hidden states, that the stem computes from
    the tokens (an encoder's output read by cross-attention: Florence-2's BART decoder). The weights
    that read them get output gradients only if the reverse pass differentiates through them, as
    through side inputs; masks and positions do not depend on the tokens and are left out."""
    emb = runner.model.get_input_embeddings()
    hook = emb.register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_(True))
    try:
        with torch.enable_grad():
            cap = runner.capture(grad=True, **inputs)
    finally:
        hook.remove()
    return {i: keys for i, c in enumerate(cap.calls) if c is not None
            and (keys := [k for k in c.tensor_keys() if c.get(k).requires_grad])}


class PassRunner:
    """Streamed passes over groups of probe batches, recording statistics into a StatsRecorder.

    `inputs(rows)` gives the model inputs of probe rows on the compute device; `on_layer(weights)`,
    when given to `run`, is called once the statistics of a layer's weights are complete while
    that layer is loaded (the last pass cuts masks there).
    """

    def __init__(self, settings: ProbeSettings, runner, selection: WeightSelection, inputs: Callable[[slice], dict],
                 progress: bool):
        self.s, self.runner, self.sel, self.inputs, self.progress = settings, runner, selection, inputs, progress
        self.side_inputs: dict[int, list] = {}

    # ---- the call trace -------------------------------------------------
    def trace_calls(self, images: bool) -> None:
        """One stem forward (and backward, with images) on the first batch, before any statistics
        (data-free):
        - which decoder layers the model does not call for these probes (not scored);
        - which tensor arguments of the decoder layers besides the hidden states the image reaches
          (side inputs such as Mllama's cross-attention states): the reverse pass differentiates
          through them too, so the weights that read them get sensitivities;
        - which vision and projector weights cannot influence the output (layers after the selected
          feature layer, unused heads): they are not scored, and the sidecar says why."""
        self.side_inputs = {}
        inputs = self.inputs(slice(0, 1))
        with torch.no_grad():  # also settles the one-off check of inter-layer terms before hooks record
            calls = self.runner.capture(**inputs).calls
        self.sel.drop_uncalled(calls)
        token_side = token_side_inputs(self.runner, inputs)
        if images:
            self.sel.keep_reaching(self._reached_stem(inputs))
        for i, keys in token_side.items():
            self.side_inputs[i] = list(dict.fromkeys(self.side_inputs.get(i, []) + keys))

    def _reached_stem(self, inputs: dict) -> set[str]:
        """The stem modules whose outputs reach the decoder's inputs; records the side inputs."""
        outputs: dict[str, torch.Tensor] = {}
        modules = {w.module for w in self.sel.stem_weights}
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
                ends = [cap.hidden] + [t for _, t in self.stem_ends(cap)]
                ends = [e for e in ends if e.requires_grad]
                names = [m for m in modules if m in outputs and outputs[m].requires_grad]
                grads = torch.autograd.grad(sum(e.float().sum() for e in ends), [outputs[m] for m in names],
                                            allow_unused=True) if ends and names else []
        finally:
            for h in hooks:
                h.remove()
        return {m for m, g in zip(names, grads) if g is not None}

    def stem_ends(self, cap) -> list[tuple[tuple, torch.Tensor]]:
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

    # ---- one pass -------------------------------------------------------
    def run(self, rec: StatsRecorder, batches, spill: bool, on_layer: Callable[[list], None] | None = None) -> None:
        """One streamed pass (forward, head, backward, stem) over a group of probe batches, their layer
        inputs kept in an ActivationStore (spilled to disk if `spill`)."""
        store = ActivationStore(spill=spill)
        try:
            captured = self._capture(store, batches)
            self._forward(rec, store, captured, batches, on_layer)
            self._head_stats(rec, store, batches)
            if self.s.method != "dowser":  # wanda: forward statistics only
                return
            grads = self._head_gradients(store, batches)
            end_grads = self._backward(rec, store, captured, batches, grads, on_layer)
            # 5. the stem (vision tower, projector), recomputed with gradients into the pixels
            if self.sel.stem_weights:
                self._stem_stats(rec, batches, grads, end_grads)
        finally:
            store.close()

    def _capture(self, store: ActivationStore, batches) -> dict:
        """1. what every layer is called with (embedding stage; vision tower for images)."""
        with torch.no_grad():
            captured = {b: self.runner.capture(**self.inputs(rows)) for b, rows in batches}
        for b, _ in batches:
            store.put(b, 0, captured[b].hidden)
            captured[b].hidden = None
        return captured

    def _forward(self, rec: StatsRecorder, store: ActivationStore, captured, batches, on_layer) -> None:
        """2. forward: each layer once for the whole group; keep every layer's input (wanda records here)."""
        runner, by_layer = self.runner, self.sel.by_layer
        n_layers = len(runner.layers)
        needs_grad = self.s.method == "dowser"
        last = n_layers if needs_grad or self.sel.head_weights else max(self.sel.layers) + 1
        with torch.no_grad(), progress_bar(self.progress, last, "forward") as bar:
            for i, layer in runner.stream(range(last)):
                handles = [] if needs_grad else rec.attach(by_layer[i], runner.model)
                for b, _ in batches:
                    h = captured[b].call(i, layer, store.get(b, i), runner.tuple_out)
                    check_finite(self.runner, h, "activations", i)
                    store.put(b, i + 1, h)
                    if not needs_grad:
                        rec.finish_update(by_layer[i])
                for h in handles:
                    h.remove()
                if on_layer is not None and not needs_grad:
                    on_layer(by_layer[i])
                bar.update(1)

    def _head_gradients(self, store: ActivationStore, batches) -> dict:
        """3. head: M Rademacher draws of the last-position logits -> gradients at the top."""
        s, n_layers = self.s, len(self.runner.layers)
        grads = {}
        for b, _ in batches:
            top = store.get(b, n_layers).requires_grad_(True)
            with torch.enable_grad():
                logits = self.runner.head_logits(top)
                xi = rademacher(s.seed, b, s.draws, logits.shape).to(logits.device, logits.dtype)
                check_finite(self.runner, logits, "logits", None)
                grads[b] = [
                    torch.autograd.grad((xi[d] * logits).sum() / logits.shape[0], top,
                                        retain_graph=d < s.draws - 1)[0]
                    for d in range(s.draws)
                ]
            for g in grads[b]:
                check_finite(self.runner, g, "gradients", None)
            store.drop(b, n_layers)
        return grads

    def _backward(self, rec: StatsRecorder, store: ActivationStore, captured, batches, grads, on_layer) -> dict:
        """4. backward, layer by layer in reverse; one recomputed forward per batch serves all M draws.
        What the stem feeds in besides the layer-0 hidden states (a term added after layer i, a side
        input such as cross-attention states) gets its gradient here, for the stem's own backward."""
        runner, by_layer = self.runner, self.sel.by_layer
        n_layers = len(runner.layers)
        end_grads = {b: {} for b, _ in batches}
        lowest = 0 if self.sel.stem_weights else min(self.sel.layers)
        with progress_bar(self.progress, n_layers - lowest, "backward") as bar:
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
                if on_layer is not None:
                    on_layer(by_layer[i])
                bar.update(1)
        return end_grads

    def _layer_backward(self, i, layer, call, captured, x, grads, end_grads) -> list[torch.Tensor]:
        """The M draws' gradients at layer i's input, from those at its output: one recomputed forward,
        gradients with respect to the input (and the layer's side inputs) only, never the weights."""
        draws = self.s.draws
        keys = self.side_inputs.get(i, [])
        side = {k: call.get(k).detach().requires_grad_(True) for k in keys}
        x = x.requires_grad_(True)
        # what earlier layers handed this one (leaves) and what it hands later ones (written): model/carry.py
        y, leaves, written = captured.recompute(i, layer, x, self.runner.tuple_out, side)
        wrt = [x] + list(side.values()) + [t for _, t in leaves]
        out = []
        for d in range(draws):
            ys, gys = captured.carried.outputs(y, grads[d], written, d) if written else (y, grads[d])
            g = torch.autograd.grad(ys, wrt, gys, retain_graph=d < draws - 1, allow_unused=True)
            if leaves:
                captured.carried.carry(leaves, g[1 + len(keys):], d, draws)
            check_finite(self.runner, g[0], "gradients", i)
            out.append(g[0])
            for k, gk, t in zip(keys, g[1:], side.values()):
                end_grads.setdefault(("side", i, k), [None] * draws)[d] = torch.zeros_like(t) if gk is None else gk
        if written:
            captured.carried.done(written)
        return out

    def _stem_stats(self, rec: StatsRecorder, batches, grads, end_grads) -> None:
        s, runner, stem = self.s, self.runner, self.sel.stem_weights
        handles = rec.attach(stem, runner.model)
        try:
            for b, rows in batches:
                inputs = self.inputs(rows)
                leaves = [v.requires_grad_(True) for v in inputs.values() if torch.is_tensor(v) and v.is_floating_point()]
                with torch.enable_grad():
                    cap = runner.capture(grad=True, **inputs)
                    ends = [(cap.hidden, grads[b])] + [(t, end_grads[b][pos]) for pos, t in self.stem_ends(cap)
                                                       if pos in end_grads[b]]
                    ends = [(e, g) for e, g in ends if e.requires_grad]
                    for d in range(s.draws):
                        torch.autograd.grad([e for e, _ in ends], leaves, [g[d] for _, g in ends],
                                            retain_graph=d < s.draws - 1, allow_unused=True)
                rec.finish_update(stem)
        finally:
            for h in handles:
                h.remove()

    def _head_stats(self, rec: StatsRecorder, store: ActivationStore, batches) -> None:
        """lm_head: psi = 1 (the output boundary), a = mean |its input| over all tokens, from
        the model's own post-decoder computation."""
        if not self.sel.head_weights:
            return
        w = self.sel.head_weights[0]
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
            rec.psi.setdefault(w.key, []).append(torch.ones(self.sel.sizes[w.key][0]))
            rec.a.setdefault(w.key, []).append(a.cpu())
