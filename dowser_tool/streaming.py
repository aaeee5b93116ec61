"""Block streaming: a model skeleton whose decoder layers hold weights one at a time.

The full model is built from its config with every parameter on the `meta`
device (buffers such as rotary frequencies stay real). The *stem* (embeddings,
vision tower, projector, final norm, head: everything outside the decoder
layers) is loaded once; decoder layers are loaded from the `Checkpoint` when
they run and released afterwards, so memory holds one layer, not the model.

The first layer's inputs (hidden states and every keyword argument: position
embeddings, attention mask, cache, ...) are captured with a forward pre-hook on
layer 0 that stops the forward, so only the embedding stage runs for real and
no per-architecture forward code is needed.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import Checkpoint
from .errors import DowserError
from .names import NameMap, architecture_for, block_of, ties_embeddings


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
    """Raised by the layer-0 pre-hook to stop the forward once its inputs are known."""


@dataclass
class LayerInputs:
    """What decoder layer 0 was called with; every layer is called the same way."""

    hidden: torch.Tensor
    args: tuple  # positional arguments after the hidden states
    kwargs: dict

    def call(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _parameters_on_meta():
    """Create every nn.Parameter on `meta` (buffers stay real) and skip weight init."""
    from transformers.initialization import no_init_weights

    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(config: dict, dtype: torch.dtype, where: str):
    """The transformers model for `config`, parameters on meta, in eval mode."""
    import transformers
    from transformers import AutoConfig

    arch = architecture_for(config, f"{where}/config.json")
    cfg = AutoConfig.for_model(**config)
    auto = getattr(transformers, arch.auto_class)
    try:
        with _parameters_on_meta():
            model = auto.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    except Exception as e:
        raise DowserError(f"{where}: cannot build {config.get('model_type')} from its config ({e})") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, arch


class BlockRunner:
    """Runs a checkpoint's decoder layer by layer on one device."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, resident: bool = False):
        if ckpt.config is None:
            raise DowserError(f"{ckpt.where}: no config.json")
        self.ckpt, self.device, self.dtype, self.resident = ckpt, device, dtype, resident
        self.model, self.arch = build_skeleton(ckpt.config, dtype, ckpt.where)
        self.names = NameMap(ckpt.tensor_names(), self.arch, ties_embeddings(ckpt.config, self.arch), ckpt.where)
        self.layers: nn.ModuleList = self.model.get_submodule(self.arch.layers)
        if self.names.num_layers() == 0:
            raise DowserError(f"{ckpt.where}: no decoder layers found under {self.arch.layers!r}")
        if self.names.num_layers() != len(self.layers):
            raise DowserError(
                f"{ckpt.where}: config has {len(self.layers)} decoder layers, checkpoint has {self.names.num_layers()}"
            )
        self.final_norm = self.model.get_submodule(self.arch.final_norm)
        self.head = self.model.get_submodule(self.arch.head)
        self._layer_params = [self._params_of(f"{self.arch.layers}.{i}") for i in range(len(self.layers))]
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self.read_seconds = 0.0  # time spent reading layer weights (in the prefetch thread)
        self.wait_seconds = 0.0  # time the compute loop waited for a layer to arrive
        self._load_stem()

    # ---- weights -------------------------------------------------------
    def _params_of(self, prefix: str) -> list[str]:
        return [n for n, _ in self.model.named_parameters() if n.startswith(prefix + ".")]

    def _set(self, name: str, value: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Canonical names -> tensors on the device in the compute dtype (one ranged read per block)."""
        ckpt_names = {n: self.names.to_checkpoint(n) for n in names}
        raw = self.ckpt.read_many(sorted(set(ckpt_names.values())))
        out = {}
        for n, cn in ckpt_names.items():
            t = raw[cn]
            expected = tuple(self.model.get_parameter(n).shape)
            if tuple(t.shape) != expected:
                raise DowserError(f"{self.ckpt.where}: {cn!r} has shape {list(t.shape)}, the config implies {list(expected)}")
            moved = t.to(self.device, self.dtype)
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
        in_layers = {n for names in self._layer_params for n in names}
        stem = [n for n, _ in self.model.named_parameters() if n not in in_layers]
        missing = [n for n in stem if n not in self.names]
        if missing:
            raise DowserError(f"{self.ckpt.where}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
        for n, t in self._read(stem).items():
            self._set(n, t)
        for module in self.model.modules():
            for bname, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[bname] = buf.to(self.device)
        # Tied weights: one tensor object for both names, as in the real model.
        if self.names.tied_alias:
            for alias, target in self.names.tied_alias.items():
                self._set(alias, self.model.get_parameter(target))

    def fetch_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Read layer i's weights (safe to call from a background thread)."""
        if i in self._resident:
            return self._resident[i]
        t0 = time.perf_counter()
        tensors = self._read(self._layer_params[i])
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
        for n in self._layer_params[i]:
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

    def layer_param_names(self, i: int) -> list[str]:
        return list(self._layer_params[i])

    def checkpoint_name(self, canonical: str) -> str:
        return self.names.to_checkpoint(canonical)

    # ---- running -------------------------------------------------------
    def capture(self, **inputs) -> LayerInputs:
        """Run the embedding stage (and vision tower + projector) and return layer 0's inputs."""
        store = {}

        def hook(module, args, kwargs):
            store["args"], store["kwargs"] = args, kwargs
            raise _Captured

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**inputs)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "args" not in store:
            raise DowserError(f"{self.ckpt.where}: the model's forward never reached decoder layer 0")
        args, kwargs = store["args"], dict(store["kwargs"])
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        return LayerInputs(hidden, rest, kwargs)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head at the last position: (batch, vocab)."""
        return self.head(self.final_norm(hidden[:, -1:, :]))[:, -1, :]

    def is_linear(self, canonical: str) -> bool:
        module_name = canonical.rpartition(".")[0]
        try:
            return isinstance(self.model.get_submodule(module_name), nn.Linear) and canonical.endswith(".weight")
        except AttributeError:
            return False

    def block_of(self, canonical: str) -> str:
        return block_of(canonical, self.arch)

