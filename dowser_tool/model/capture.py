"""How a model calls its decoder layers, and what it does after the last one, by its own forward.

Owns the call capture of the block runner (`CallCapture`): what each decoder layer is called
with is captured by running the model's own forward with every layer replaced by a recording
stub (`capture`): the hidden states entering layer 0, and for every layer its own positional
and keyword arguments (sliding-window vs full attention masks, local vs global rotary
embeddings, cross-attention states, ...), or that the model does not call it for this input
(Mllama's cross-attention layers without images). If the model changes the hidden states
between two layers, the change is recorded when it is additive and independent of the hidden
states (Qwen3-VL's deepstack), and refused otherwise. What the model does after the last layer
(final norm, head, logit soft-capping, ...) is run by the model itself too (`head_logits`): the
stubs hand it the streamed hidden states. No per-architecture forward code, and no weights:
where the layers' weights come from is tiers.py, loading them into the model streaming.py.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DowserError
from .carry import CarriedState


class _Captured(Exception):
    """Raised by the last layer's stub to stop the forward once every layer's inputs are known."""


@dataclass
class LayerCall:
    """How the model calls one decoder layer for one batch: positional arguments after the
    hidden states, keyword arguments, and the additive change (or None) the model makes to
    the layer's output before the next layer sees it.

    A *side input* is any other tensor argument the image reaches (Mllama's
    `cross_attention_states`), named by its position in `args` (int) or its keyword (str)."""

    args: tuple
    kwargs: dict
    delta: torch.Tensor | None = None

    def get(self, key):
        return self.args[key] if isinstance(key, int) else self.kwargs[key]

    def with_inputs(self, side: dict) -> tuple[tuple, dict]:
        """(args, kwargs) with the side inputs in `side` ({key: tensor}) substituted."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for key, value in side.items():
            if isinstance(key, int):
                args[key] = value
            else:
                kwargs[key] = value
        return tuple(args), kwargs

    def tensor_keys(self) -> list:
        """Keys of every floating-point tensor argument besides the hidden states."""
        keys = [i for i, a in enumerate(self.args) if torch.is_tensor(a) and a.is_floating_point()]
        return keys + [k for k, v in self.kwargs.items() if torch.is_tensor(v) and v.is_floating_point()]


@dataclass
class Captured:
    """Layer-0 input hidden states and, per decoder layer, its LayerCall (None: not called);
    `carried`: what the layers hand each other besides the hidden states (carry.py), or None."""

    hidden: torch.Tensor | None
    calls: list[LayerCall | None] = field(default_factory=list)
    carried: CarriedState | None = None

    def call(self, i: int, layer: nn.Module, hidden: torch.Tensor, tuple_out: bool, side: dict | None = None):
        """Layer i's output as the next layer sees it (the hidden states unchanged if not called);
        `side` substitutes side inputs ({key: tensor}). The forward: layers run in order, and what
        they hand later layers is followed (`CarriedState.before`/`after`)."""
        if self.calls[i] is None:
            return hidden
        if self.carried is not None:
            self.carried.before(i)
        out = self._run(i, layer, hidden, tuple_out, side)
        if self.carried is not None:
            self.carried.after(i)
        return out

    def recompute(self, i: int, layer: nn.Module, hidden: torch.Tensor, tuple_out: bool, side: dict | None = None):
        """Layer i's output again, for the reverse pass, after the forward (`call`) ran every layer:
        (output, leaves, written), where `leaves` are what earlier layers handed it, as leaves requiring
        grad, and `written` what it handed later layers whose gradients are pending (carry.py; both
        empty for a model whose layers share nothing)."""
        if self.carried is None or i not in self.carried.seen:
            return self._run(i, layer, hidden, tuple_out, side), [], []
        leaves = self.carried.restore(i)
        out = self._run(i, layer, hidden, tuple_out, side)
        return out, leaves, self.carried.written(i)

    def _run(self, i: int, layer: nn.Module, hidden: torch.Tensor, tuple_out: bool, side: dict | None):
        c = self.calls[i]
        args, kwargs = c.with_inputs(side) if side else (c.args, c.kwargs)
        out = layer(hidden, *args, **kwargs)
        if tuple_out or isinstance(out, (tuple, list)):
            out = out[0]
        return out if c.delta is None else out + c.delta


def _split_hidden(args, kwargs):
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


class CallCapture:
    """Records how `model`'s forward calls `layers` (its decoder layers) and runs its head.

    `where` names the checkpoint in errors. `tuple_out` is found by the first `capture`: whether
    the model's layer loop expects layers to return tuples.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, where: str):
        self.model, self.layers, self.where = model, layers, where
        self.tuple_out = False  # whether the model's loop expects layers to return tuples
        self._checked_deltas = False
        params = inspect.signature(self.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params

    @contextlib.contextmanager
    def _stubs(self, stub_for):
        """Replace every decoder layer's forward with stub_for(i) inside the block."""
        for i, layer in enumerate(self.layers):
            layer.forward = stub_for(i)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    def _record(self, inputs: dict, shift: float = 0.0):
        """One forward with recording stubs: per layer (input hidden, its call, the stub's output).

        A stub returns its input as a new tensor object (a detached view, no copy), so that
        the next layer's input is that very object unless the model changed it in between."""
        n = len(self.layers)
        seen: list = [None] * n

        def stub_for(i):
            def stub(*args, **kwargs):
                hidden, rest, kw = _split_hidden(args, kwargs)
                out = hidden.detach() if shift == 0.0 else hidden.detach() + shift
                seen[i] = (hidden, LayerCall(rest, kw), out)
                if i == n - 1:
                    raise _Captured
                return (out,) if self.tuple_out else out
            return stub

        with self._stubs(stub_for):
            try:
                self.model(**inputs)
            except _Captured:
                pass
        return seen

    def capture(self, grad: bool = False, **inputs) -> Captured:
        """Run the stem (embeddings, vision tower, projector) on `inputs` and record how every
        decoder layer is called. With `grad`, the layer-0 hidden states and the inter-layer
        terms keep their autograd graph (to backpropagate into the vision tower).

        Raises DowserError if the forward reaches no layer, or changes the hidden states
        between layers other than by adding a term independent of them."""
        seen = self._record(inputs)
        called = [i for i, s in enumerate(seen) if s is not None]
        if not called:
            raise DowserError(f"{self.where}: the model's forward never reached a decoder layer")
        if not self.tuple_out and any(seen[j][0].shape != seen[i][2].shape for i, j in zip(called, called[1:])):
            self.tuple_out = True  # the loop indexed our tensor: it expects (hidden, ...) tuples
            return self.capture(grad, **inputs)
        deltas = self._deltas(seen, called, grad)
        if any(d is not None for d in deltas.values()) and not self._checked_deltas and not grad:
            again = self._deltas(self._record(inputs, shift=1.0), called)
            for i, d in deltas.items():
                same = (d is None) == (again[i] is None) and (d is None or torch.allclose(d, again[i], rtol=1e-4, atol=1e-5))
                if not same:
                    raise DowserError(
                        f"{self.where}: {type(self.model).__name__} changes the hidden states between decoder "
                        f"layers {i} and {i + 1} in a way that depends on them; it cannot be probed layer by layer")
            self._checked_deltas = True
        calls = []
        for i, s in enumerate(seen):
            if s is None:
                calls.append(None)
            else:
                s[1].delta = deltas.get(i)
                calls.append(s[1])
        return Captured(seen[called[0]][0], calls, CarriedState.find(calls, f"{self.where}: {type(self.model).__name__}"))

    @staticmethod
    def _deltas(seen, called, grad: bool = False) -> dict[int, torch.Tensor | None]:
        out = {}
        for i, j in zip(called, called[1:]):
            passed, returned = seen[j][0], seen[i][2]
            if passed is returned:
                out[i] = None
                continue
            d = (passed if grad else passed.detach()) - returned
            out[i] = d if bool(d.ne(0).any()) else None
        return out

    def head_logits(self, hidden: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """What the model computes after its last decoder layer (final norm, head, any logit
        soft-capping), at the last position: (batch, vocab); every position with
        `all_positions` (batch, tokens, vocab). Differentiable in `hidden`."""
        def stub_for(i):
            def stub(*args, **kwargs):
                return (hidden,) if self.tuple_out else hidden
            return stub

        batch, length = hidden.shape[:2]
        embed_dim = self.model.get_input_embeddings().weight.shape[-1]
        dummy = torch.zeros(batch, length, embed_dim, device=hidden.device, dtype=hidden.dtype)
        kwargs = {"inputs_embeds": dummy, "use_cache": False}
        if self._logits_to_keep and not all_positions:
            kwargs["logits_to_keep"] = 1
        with self._stubs(stub_for):
            out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits if all_positions else logits[:, -1, :]

    def step_logits(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Last-position logits of one generation step by the model's own forward (all layers loaded),
        reusing and extending `cache` (transformers' DynamicCache)."""
        kwargs = {"input_ids": input_ids, "cache": cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return (out.logits if hasattr(out, "logits") else out[0])[:, -1, :]
