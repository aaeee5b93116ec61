"""Where decoder-layer weights come from and where they stay between uses: the memory tiers.

Owns the layer source of the block runner (`LayerStore`): each byte of the checkpoint leaves
its source once, and layers needed again (every generated token, the forward and the reverse
pass) come from the fastest tier the whole decoder fits in, decided from the memory free when
the run starts (`plan_tier`): GPU memory, then host RAM (pinned when computing on CUDA). If
they fit in neither, every pass re-reads them: from the source folder (memory map, touched
page by page in the prefetch thread so the disk read overlaps compute), or, for a Hub
checkpoint, from a temporary local layer cache written on the first read (`LayerCache`), so
nothing is fetched over HTTP twice. Also gives freed heap pages back to the OS (`trim_heap`).
It knows nothing of how the model calls its layers (capture.py) or of the model's forward.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref

import torch

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


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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


class LayerStore:
    """A checkpoint's decoder layers, read in the compute dtype and kept in their memory tier.

    `tier` is 'gpu', 'ram' or 'stream' (`residency` names one, or is the `plan_tier` setting).
    Raises DowserError (from `LayerCache`) when a Hub checkpoint's layer cache does not fit on disk.
    """

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, anatomy: Anatomy,
                 residency: str = "auto", cache_dir: str | None = None):
        self.ckpt, self.device, self.dtype, self.anatomy = ckpt, device, dtype, anatomy
        self.model = anatomy.model
        itemsize = torch.empty((), dtype=dtype).element_size()
        shapes = anatomy.shapes
        self.layer_keys = [[k for p in params for k in anatomy.keys.sources[p]] for params in anatomy.layer_params]
        self.layer_bytes = sum(_numel(shapes[k]) * itemsize for keys in self.layer_keys for k in keys)
        self.tier = residency if residency in TIERS else plan_tier(self.layer_bytes, device, residency)
        self.cache = None
        if ckpt.is_remote and not ckpt._files.download:  # ranged HTTP reads: keep what was read
            need = sum(_numel(shapes[k]) * ckpt.dtype(k).itemsize for k in shapes)
            self.cache = LayerCache(ckpt, need, cache_dir)
        self.reader = self.cache.read_many if self.cache else ckpt.read_many
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self.layer_reads = [0] * len(anatomy.layers)  # reads of each layer from the source or the disk cache
        self.read_seconds = 0.0  # time spent reading layer weights (in the prefetch thread)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def keeps_loaded(self) -> bool:
        """Whether every layer stays loaded in the model once read (resident on the compute device)."""
        return self.tier == "gpu" or (self.tier == "ram" and self.device.type == "cpu")

    @property
    def passes(self) -> float:
        """Passes over the decoder weights read from their source or the disk cache."""
        return sum(self.layer_reads) / max(len(self.layer_reads), 1)

    def read_raw(self, keys) -> dict[str, torch.Tensor]:
        """Checkpoint tensors as stored (dtype and values), through the layer cache for the Hub."""
        return self.reader(list(keys))

    def close(self) -> None:
        """Remove the layer cache (a no-op for local checkpoints)."""
        if self.cache is not None:
            self.cache.close()

    def read(self, params: list[str], host: bool = False, touch: bool = True) -> dict[str, torch.Tensor]:
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
            host = self.read(self.anatomy.layer_params[i], host=cuda)
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
