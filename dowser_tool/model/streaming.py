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

Each byte of the checkpoint leaves its source once. Layers needed again (every
generated token, the forward and the reverse pass) come from the fastest tier
the whole decoder fits in, decided from the memory free when the run starts
(`plan_tier`): GPU memory, then host RAM (pinned when computing on CUDA). If
they fit in neither, every pass re-reads them: from the source folder (memory
map), or, for a Hub checkpoint, from a temporary local layer cache written on
the first read (`LayerCache`), so nothing is fetched over HTTP twice.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from .anatomy import Anatomy
from ..io.checkpoint import Checkpoint
from ..errors import DowserError


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
    """Layer-0 input hidden states and, per decoder layer, its LayerCall (None: not called)."""

    hidden: torch.Tensor | None
    calls: list[LayerCall | None] = field(default_factory=list)

    def call(self, i: int, layer: nn.Module, hidden: torch.Tensor, tuple_out: bool, side: dict | None = None):
        """Layer i's output as the next layer sees it (the hidden states unchanged if not called);
        `side` substitutes side inputs ({key: tensor})."""
        c = self.calls[i]
        if c is None:
            return hidden
        args, kwargs = c.with_inputs(side) if side else (c.args, c.kwargs)
        out = layer(hidden, *args, **kwargs)
        if tuple_out or isinstance(out, (tuple, list)):
            out = out[0]
        return out if c.delta is None else out + c.delta


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _split_hidden(args, kwargs):
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


TIERS = ("gpu", "ram", "stream")


def available_ram() -> int:
    """Bytes of host memory available now (Linux MemAvailable), else 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def plan_tier(layer_bytes: int, device: torch.device, setting: str = "auto") -> str:
    """Where the decoder layers stay between uses: 'gpu', 'ram' or 'stream' (re-read every pass).

    layer_bytes: all decoder layers in the compute dtype. `setting` 'always' keeps them in
    the fastest tier, 'never' streams; 'auto' keeps them on the GPU if they fit in 70% of its
    free memory, else in host RAM if they fit in half of the memory available now.
    """
    if setting == "never":
        return "stream"
    cuda = device.type == "cuda"
    if setting == "always":
        return "gpu" if cuda else "ram"
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        if layer_bytes <= 0.7 * free:
            return "gpu"
    return "ram" if layer_bytes <= available_ram() // 2 else "stream"


class LayerCache:
    """A Hub checkpoint's tensors kept on local disk after their first (HTTP) read.

    One safetensors file per read (a layer, the stem), in a temporary folder under
    `parent` (the working directory by default), removed by `close()`. Raises
    DowserError before anything is written if the free disk cannot hold `need` bytes.
    """

    def __init__(self, ckpt: Checkpoint, need: int, parent: str | None = None):
        parent = os.path.abspath(parent or os.getcwd())
        if not os.path.isdir(parent):
            raise DowserError(f"{parent}: --cache-dir does not exist")
        free = shutil.disk_usage(parent).free
        if free < need + (256 << 20):
            raise DowserError(f"{parent}: the layer cache needs {need / 1e9:.1f} GB of free disk, only "
                              f"{free / 1e9:.1f} GB free (pass --cache-dir on a larger disk, or --download)")
        self.ckpt = ckpt
        self.dir = tempfile.mkdtemp(prefix=".dowser-layers-", dir=parent)
        # Removed at close(), or when this object is collected or the interpreter exits (a caller
        # that never reached close(): an exception in library code that holds a runner).
        self._remove = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        self._file_of: dict[str, str] = {}
        self.bytes_cached = 0

    def read_many(self, keys) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        from safetensors.torch import save_file

        keys = list(keys)
        fresh = [k for k in keys if k not in self._file_of]
        out = {}
        if fresh:
            got = self.ckpt.read_many(fresh, gap=0)  # every byte fetched is a byte kept
            path = os.path.join(self.dir, f"{len(set(self._file_of.values()))}.safetensors")
            save_file({k: v.contiguous() for k, v in got.items()}, path)
            self.bytes_cached += sum(v.numel() * v.element_size() for v in got.values())
            for k in fresh:
                self._file_of[k] = path
            del got
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._file_of[k], []).append(k)
        for path, group in by_file.items():
            with safe_open(path, framework="pt", device="cpu") as f:
                for k in group:
                    out[k] = f.get_tensor(k)
        return {k: out[k] for k in keys}

    def close(self) -> None:
        self._remove()


class BlockRunner:
    """Runs a checkpoint's decoder layer by layer on one device.

    Raises DowserError for a checkpoint without config.json, a model transformers cannot
    build, tensors that do not fit the config, or a model whose forward changes hidden
    states between layers in a way that cannot be streamed.
    """

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, residency: str = "auto",
                 anatomy: Anatomy | None = None, cache_dir: str | None = None):
        if ckpt.config is None:
            raise DowserError(f"{ckpt.where}: no config.json")
        self.ckpt, self.device, self.dtype = ckpt, device, dtype
        self.anatomy = anatomy or Anatomy.of(ckpt.config, {n: ckpt.shape(n) for n in ckpt.tensor_names()},
                                             ckpt.where, dtype)
        self.model = self.anatomy.model
        self.layers: nn.ModuleList = self.anatomy.layers
        itemsize = torch.empty((), dtype=dtype).element_size()
        shapes = self.anatomy.shapes
        self.layer_keys = [[k for p in params for k in self.anatomy.keys.sources[p]] for params in self.anatomy.layer_params]
        self.layer_bytes = sum(_numel(shapes[k]) * itemsize for keys in self.layer_keys for k in keys)
        self.tier = residency if residency in TIERS else plan_tier(self.layer_bytes, device, residency)
        self.cache = None
        if ckpt.is_remote and not ckpt._files.download:  # ranged HTTP reads: keep what was read
            need = sum(_numel(shapes[k]) * ckpt.dtype(k).itemsize for k in shapes)
            self.cache = LayerCache(ckpt, need, cache_dir)
        self.reader = self.cache.read_many if self.cache else ckpt.read_many
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self.layer_reads = [0] * len(self.layers)  # reads of each layer from the source or the disk cache
        self.read_seconds = 0.0  # time spent reading layer weights (in the prefetch thread)
        self.wait_seconds = 0.0  # time the compute loop waited for a layer to arrive
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
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

    @property
    def keeps_loaded(self) -> bool:
        """Whether every layer stays loaded in the model once read (resident on the compute device)."""
        return self.tier == "gpu" or (self.tier == "ram" and self.device.type == "cpu")

    @property
    def passes(self) -> float:
        """Passes over the decoder weights read from their source or the disk cache."""
        return sum(self.layer_reads) / max(len(self.layers), 1)

    def read_raw(self, keys) -> dict[str, torch.Tensor]:
        """Checkpoint tensors as stored (dtype and values), through the layer cache for the Hub."""
        return self.reader(list(keys))

    def close(self) -> None:
        """Remove the layer cache (a no-op for local checkpoints)."""
        if self.cache is not None:
            self.cache.close()

    def _read(self, params: list[str], host: bool = False, touch: bool = True) -> dict[str, torch.Tensor]:
        """In-memory parameter names -> tensors in the compute dtype, on the device (on the host,
        pinned for CUDA, with `host`). With `touch`, memory-mapped tensors are read in now."""
        out = {}
        device = torch.device("cpu") if host else self.device
        for n, t in self.anatomy.keys.load(params, self.reader, self.model).items():
            expected = tuple(self.model.get_parameter(n).shape)
            if tuple(t.shape) != expected:
                keys = self.anatomy.keys.sources[n]
                raise DowserError(f"{self.ckpt.where}: {keys[0]!r} gives {n!r} shape {list(t.shape)}, "
                                  f"the config implies {list(expected)}")
            moved = t.to(device, self.dtype) if t.is_floating_point() else t.to(device)
            if host and self.device.type == "cuda":
                moved = moved.pin_memory()
            if touch and moved.data_ptr() == t.data_ptr() and t.numel():
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
        # Not touched: a memory-mapped embedding only ever pages in the rows the probes look up.
        for n, t in self._read(stored, touch=False).items():
            self._set(n, t)
        for target, source in a.tied.items():  # one tensor object for both names, as in the real model
            if target not in a.keys.sources and not target.startswith(f"{a.layers_path}."):
                self._set(target, self.model.get_parameter(source))
        for module in self.model.modules():
            for bname, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[bname] = buf.to(self.device)

    def fetch_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's weights on the compute device (safe to call from a background thread): from
        its memory tier, or read from the source / disk cache. On CUDA the host-to-device copy runs
        on a side stream, so that it overlaps the compute of the layer before."""
        cuda = self.device.type == "cuda"
        cached = self._resident.get(i)
        if cached is not None and (self.tier == "gpu" or not cuda):
            return cached  # already on the compute device
        t0 = time.perf_counter()
        if cached is not None:  # 'ram' tier on CUDA: the pinned host copy
            host = cached
        else:
            host = self._read(self.anatomy.layer_params[i], host=cuda)
            self.layer_reads[i] += 1
            if self.tier == "ram" and cuda:
                self._resident[i] = host
        tensors = self._to_device(host)
        if self.tier == "gpu" or (self.tier == "ram" and not cuda):
            self._resident[i] = tensors
        self.read_seconds += time.perf_counter() - t0
        return tensors

    def _to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._copy_stream is None or all(t.device == self.device for t in tensors.values()):
            return tensors
        with torch.cuda.stream(self._copy_stream):
            out = {n: t.to(self.device, non_blocking=True) for n, t in tensors.items()}
        event = torch.cuda.Event()
        event.record(self._copy_stream)
        event.synchronize()  # copies done before the compute stream uses them (this is the prefetch thread)
        return out

    def load_layer(self, i: int, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        for n, t in (tensors if tensors is not None else self.fetch_layer(i)).items():
            self._set(n, t)
        return self.layers[i]

    def release_layer(self, i: int) -> None:
        """Put the layer's parameters back on meta, freeing their memory (kept when resident)."""
        if self.keeps_loaded:
            return
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

    def load_all(self) -> None:
        """Load every decoder layer (only when they stay resident: `keeps_loaded`)."""
        if not self.keeps_loaded:
            raise RuntimeError("load_all needs a resident tier")
        for i, _ in self.stream(range(len(self.layers))):
            pass

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
        if any(d is not None for d in deltas.values()) and not self._checked_deltas and not grad:
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

    def step_logits(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Last-position logits of one generation step by the model's own forward (all layers loaded),
        reusing and extending `cache` (transformers' DynamicCache)."""
        kwargs = {"input_ids": input_ids, "cache": cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return (out.logits if hasattr(out, "logits") else out[0])[:, -1, :]

    def forward_all(self, captured: Captured, hidden: torch.Tensor, layers=None) -> torch.Tensor:
        """Run the given (default: all) loaded decoder layers in order."""
        for i in range(len(self.layers)) if layers is None else layers:
            hidden = captured.call(i, self.layers[i], hidden, self.tuple_out)
        return hidden
