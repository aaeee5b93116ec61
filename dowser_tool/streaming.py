"""Block streaming: a model skeleton whose decoder layers hold weights one at a time.

The model is built from its config with every parameter on `meta` (anatomy.py).
The *stem* (everything outside the decoder layers: embeddings, vision tower,
projector, final norm, head) is loaded once; decoder layers are loaded from the
`Checkpoint` when they run and released afterwards, so memory holds one layer,
not the model.

What each decoder layer is called with is captured by running the model's own
forward with every layer replaced by a recording stub (`capture`): the hidden
states entering layer 0, and for every layer its own positional and keyword
arguments (sliding-window vs full attention masks, local vs global rotary
embeddings, cross-attention states, ...), or that the model does not call it
for this input (Mllama's cross-attention layers without images). If the model
changes the hidden states between two layers, the change is recorded when it is
additive and independent of the hidden states (Qwen3-VL's deepstack), and
refused otherwise. What the model does after the last layer (final norm, head,
logit soft-capping, ...) is run by the model itself too (`head_logits`): the
stubs hand it the streamed hidden states. No per-architecture forward code.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from .anatomy import Anatomy
from .checkpoint import Checkpoint
from .errors import DowserError


def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the free pages inside the heap back to the OS (glibc's malloc_trim).

    Layer-sized buffers below glibc's mmap threshold live on the heap; after a
    layer is released its pages stay resident behind small live allocations,
    and resident memory would creep up with depth. Cheap next to running a layer.
    """
    if _TRIM is not None:
        _TRIM(0)


class _Captured(Exception):
    """Raised by the last layer's stub to stop the forward once every layer's inputs are known."""


@dataclass
class LayerCall:
    """How the model calls one decoder layer for one batch: positional arguments after the
    hidden states, keyword arguments, and the additive change (or None) the model makes to
    the layer's output before the next layer sees it."""

    args: tuple
    kwargs: dict
    delta: torch.Tensor | None = None


@dataclass
class Captured:
    """Layer-0 input hidden states and, per decoder layer, its LayerCall (None: not called)."""

    hidden: torch.Tensor | None
    calls: list[LayerCall | None] = field(default_factory=list)

    def call(self, i: int, layer: nn.Module, hidden: torch.Tensor, tuple_out: bool) -> torch.Tensor:
        """Layer i's output as the next layer sees it (the hidden states unchanged if not called)."""
        c = self.calls[i]
        if c is None:
            return hidden
        out = layer(hidden, *c.args, **c.kwargs)
        if tuple_out or isinstance(out, (tuple, list)):
            out = out[0]
        return out if c.delta is None else out + c.delta


def _split_hidden(args, kwargs):
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


class BlockRunner:
    """Runs a checkpoint's decoder layer by layer on one device.

    Raises DowserError for a checkpoint without config.json, a model transformers cannot
    build, tensors that do not fit the config, or a model whose forward changes hidden
    states between layers in a way that cannot be streamed.
    """

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, resident: bool = False,
                 anatomy: Anatomy | None = None):
        if ckpt.config is None:
            raise DowserError(f"{ckpt.where}: no config.json")
        self.ckpt, self.device, self.dtype, self.resident = ckpt, device, dtype, resident
        self.anatomy = anatomy or Anatomy.of(ckpt.config, {n: ckpt.shape(n) for n in ckpt.tensor_names()},
                                             ckpt.where, dtype)
        self.model = self.anatomy.model
        self.layers: nn.ModuleList = self.anatomy.layers
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self.read_seconds = 0.0  # time spent reading layer weights (in the prefetch thread)
        self.wait_seconds = 0.0  # time the compute loop waited for a layer to arrive
        self.tuple_out = False  # whether the model's loop expects layers to return tuples
        self._checked_deltas = False
        params = inspect.signature(self.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._load_stem()

    # ---- weights ---------------------------------------------------------------------------------
    def _set(self, name: str, value: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)

    def _read(self, params: list[str]) -> dict[str, torch.Tensor]:
        """In-memory parameter names -> tensors on the device in the compute dtype."""
        out = {}
        for n, t in self.anatomy.keys.load(params, self.ckpt.read_many, self.model).items():
            expected = tuple(self.model.get_parameter(n).shape)
            if tuple(t.shape) != expected:
                keys = self.anatomy.keys.sources[n]
                raise DowserError(f"{self.ckpt.where}: {keys[0]!r} gives {n!r} shape {list(t.shape)}, "
                                  f"the config implies {list(expected)}")
            moved = t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)
            if moved.data_ptr() == t.data_ptr() and t.numel():
                # safe_open hands back tensors over the file mapping: nothing is read until the
                # pages are touched. Touch one element per page here, in the prefetch thread, so
                # the disk read overlaps the previous layer's compute. (A copy would do the same
                # but puts every layer on the heap, where freed layers fragment it.)
                moved.reshape(-1)[:: max(1, 4096 // moved.element_size())].sum()
            out[n] = moved
        return out

    def _load_stem(self) -> None:
        """Load every parameter outside the decoder layers and move all buffers to the device."""
        a = self.anatomy
        stored = [n for n in a.stem_params if n in a.keys.sources]
        for n, t in self._read(stored).items():
            self._set(n, t)
        for target, source in a.tied.items():  # one tensor object for both names, as in the real model
            if target not in a.keys.sources and not target.startswith(f"{a.layers_path}."):
                self._set(target, self.model.get_parameter(source))
        for module in self.model.modules():
            for bname, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[bname] = buf.to(self.device)

    def fetch_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Read layer i's weights (safe to call from a background thread)."""
        if i in self._resident:
            return self._resident[i]
        t0 = time.perf_counter()
        tensors = self._read(self.anatomy.layer_params[i])
        self.read_seconds += time.perf_counter() - t0
        if self.resident:
            self._resident[i] = tensors
        return tensors

    def load_layer(self, i: int, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        for n, t in (tensors if tensors is not None else self.fetch_layer(i)).items():
            self._set(n, t)
        return self.layers[i]

    def release_layer(self, i: int) -> None:
        """Put the layer's parameters back on meta, freeing their memory (unless resident)."""
        for n in self.anatomy.layer_params[i]:
            p = self.model.get_parameter(n)
            self._set(n, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        trim_heap()

    @contextlib.contextmanager
    def layer(self, i: int):
        module = self.load_layer(i)
        try:
            yield module
        finally:
            self.release_layer(i)

    def stream(self, order):
        """Yield (i, layer) for i in `order`, reading the next layer in a background thread
        while the current one computes, so a pass costs about max(read, compute), not the sum."""
        order = list(order)
        if not order:
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dowser-prefetch")
        try:
            future = pool.submit(self.fetch_layer, order[0])
            for k, i in enumerate(order):
                t0 = time.perf_counter()
                tensors = future.result()
                self.wait_seconds += time.perf_counter() - t0
                future = pool.submit(self.fetch_layer, order[k + 1]) if k + 1 < len(order) else None
                self.load_layer(i, tensors)
                del tensors
                try:
                    yield i, self.layers[i]
                finally:
                    self.release_layer(i)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- running ---------------------------------------------------------------------------------
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
            raise DowserError(f"{self.ckpt.where}: the model's forward never reached a decoder layer")
        if not self.tuple_out and any(seen[j][0].shape != seen[i][2].shape for i, j in zip(called, called[1:])):
            self.tuple_out = True  # the loop indexed our tensor: it expects (hidden, ...) tuples
            return self.capture(grad, **inputs)
        deltas = self._deltas(seen, called, grad)
        if any(d is not None for d in deltas.values()) and not self._checked_deltas:
            again = self._deltas(self._record(inputs, shift=1.0), called)
            for i, d in deltas.items():
                same = (d is None) == (again[i] is None) and (d is None or torch.allclose(d, again[i], rtol=1e-4, atol=1e-5))
                if not same:
                    raise DowserError(
                        f"{self.ckpt.where}: {type(self.model).__name__} changes the hidden states between decoder "
                        f"layers {i} and {i + 1} in a way that depends on them; it cannot be probed layer by layer")
            self._checked_deltas = True
        calls = []
        for i, s in enumerate(seen):
            if s is None:
                calls.append(None)
            else:
                s[1].delta = deltas.get(i)
                calls.append(s[1])
        return Captured(seen[called[0]][0], calls)

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

    def forward_all(self, captured: Captured, hidden: torch.Tensor, layers=None) -> torch.Tensor:
        """Run the given (default: all) loaded decoder layers in order."""
        for i in range(len(self.layers)) if layers is None else layers:
            hidden = captured.call(i, self.layers[i], hidden, self.tuple_out)
        return hidden
