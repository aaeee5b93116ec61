"""Block streaming: a model skeleton whose decoder layers hold weights one at a time.

The model is built from its config with every parameter on `meta` (anatomy.py).
The *stem* (everything outside the decoder layers: embeddings, vision tower,
projector, final norm, head) is loaded once; decoder layers are loaded from the
`Checkpoint` when they run and released afterwards, so memory holds one layer,
not the model (`BlockRunner`).

The runner puts together three parts: where layer weights come from and which
memory tier keeps them between uses (tiers.py: `LayerStore`, `plan_tier`,
`LayerCache`); how the model's own forward calls each decoder layer and what it
does after the last one (capture.py: `CallCapture`, `Captured`, `LayerCall`); and,
here, the stem and moving layers in and out of the model, with the next layer read
in a background thread while the current one computes (`BlockRunner.stream`).
Names from tiers.py and capture.py stay importable from this module.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .anatomy import Anatomy
from .capture import CallCapture, Captured, LayerCall
from .tiers import TIERS, LayerCache, LayerStore, available_ram, plan_tier, trim_heap
from ..io.checkpoint import Checkpoint
from ..errors import DowserError

__all__ = ["BlockRunner", "CallCapture", "Captured", "LayerCall", "LayerCache", "LayerStore", "TIERS",
           "available_ram", "plan_tier", "trim_heap"]


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
        self.store = LayerStore(ckpt, device, dtype, self.anatomy, residency, cache_dir)
        self.calls = CallCapture(self.model, self.layers, ckpt.where)
        self.wait_seconds = 0.0  # time the compute loop waited for a layer to arrive
        self._load_stem()

    # ---- the memory tiers (tiers.py) -------------------------------------------------------------
    @property
    def tier(self) -> str:
        """Where decoder layers stay between uses: 'gpu', 'ram' or 'stream'."""
        return self.store.tier

    @property
    def cache(self) -> LayerCache | None:
        """The Hub checkpoint's local layer cache (None for a local checkpoint)."""
        return self.store.cache

    @property
    def layer_reads(self) -> list[int]:
        """Reads of each layer from the source or the disk cache."""
        return self.store.layer_reads

    @property
    def read_seconds(self) -> float:
        """Time spent reading layer weights (in the prefetch thread)."""
        return self.store.read_seconds

    @property
    def keeps_loaded(self) -> bool:
        """Whether every layer stays loaded in the model once read (resident on the compute device)."""
        return self.store.keeps_loaded

    @property
    def passes(self) -> float:
        """Passes over the decoder weights read from their source or the disk cache."""
        return self.store.passes

    def read_raw(self, keys) -> dict[str, torch.Tensor]:
        """Checkpoint tensors as stored (dtype and values), through the layer cache for the Hub."""
        return self.store.read_raw(keys)

    def fetch_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's weights on the compute device (`LayerStore.fetch_layer`; thread-safe)."""
        return self.store.fetch_layer(i)

    def close(self) -> None:
        """Remove the layer cache (a no-op for local checkpoints)."""
        self.store.close()

    # ---- moving weights in and out of the model --------------------------------------------------
    def _set(self, name: str, value: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)

    def _load_stem(self) -> None:
        """Load every parameter outside the decoder layers and move all buffers to the device."""
        a = self.anatomy
        stored = [n for n in a.stem_params if n in a.keys.sources]
        # Not touched: a memory-mapped embedding only ever pages in the rows the probes look up.
        for n, t in self.store.read(stored, touch=False).items():
            self._set(n, t)
        for target, source in a.tied.items():  # one tensor object for both names, as in the real model
            if target not in a.keys.sources and not target.startswith(f"{a.layers_path}."):
                self._set(target, self.model.get_parameter(source))
        for module in self.model.modules():
            for bname, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[bname] = buf.to(self.device)

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

    # ---- the model's own forward (capture.py) ----------------------------------------------------
    @property
    def tuple_out(self) -> bool:
        """Whether the model's layer loop expects layers to return tuples (found by `capture`)."""
        return self.calls.tuple_out

    @tuple_out.setter
    def tuple_out(self, value: bool) -> None:
        self.calls.tuple_out = value

    def capture(self, grad: bool = False, **inputs) -> Captured:
        """How every decoder layer is called for `inputs` (`CallCapture.capture`)."""
        return self.calls.capture(grad, **inputs)

    def head_logits(self, hidden: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """What the model computes after its last decoder layer (`CallCapture.head_logits`)."""
        return self.calls.head_logits(hidden, all_positions)

    def step_logits(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Last-position logits of one generation step, all layers loaded (`CallCapture.step_logits`)."""
        return self.calls.step_logits(input_ids, cache)

    def forward_all(self, captured: Captured, hidden: torch.Tensor, layers=None) -> torch.Tensor:
        """Run the given (default: all) loaded decoder layers in order."""
        for i in range(len(self.layers)) if layers is None else layers:
            hidden = captured.call(i, self.layers[i], hidden, self.tuple_out)
        return hidden
