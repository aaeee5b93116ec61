"""The safetensors file layout, read and written without the whole file in memory.

Layout (https://huggingface.co/docs/safetensors): 8 bytes little-endian u64 N,
then N bytes of JSON header {name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {str: str}}, then the data area; offsets are relative to it.

We parse headers ourselves (instead of trusting `safe_open`) because the probe
and merge must refuse a lying or truncated file with a one-line message before
any byte of output exists, and because remote files are read by byte range.
The writer is header-first so a shard is streamed tensor by tensor: the
safetensors library has no streaming writer.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterable

if TYPE_CHECKING:
    import torch

from ..errors import DowserError

# The safetensors library refuses headers above 100 MB; so do we, before allocating.
MAX_HEADER_BYTES = 100_000_000

# Bytes per element of each safetensors dtype string. Parsing and checking headers needs only this,
# so reading a header (`dowser inspect`) never imports torch.
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}

# safetensors dtype string -> torch dtype name; `DTYPES` and `TORCH_TO_ST` are built from it on first use.
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_torch_maps: tuple[dict, dict] | None = None


def _dtype_maps() -> tuple[dict, dict]:
    """(DTYPES: str -> torch.dtype, TORCH_TO_ST: torch.dtype -> str), built once (imports torch)."""
    global _torch_maps
    if _torch_maps is None:
        import torch

        dtypes = {st: getattr(torch, name) for st, name in _TORCH_NAMES.items() if hasattr(torch, name)}
        _torch_maps = (dtypes, {v: k for k, v in dtypes.items()})
    return _torch_maps


def __getattr__(name):
    # DTYPES (str -> torch.dtype) and TORCH_TO_ST (torch.dtype -> str) need torch: built on first access.
    if name == "DTYPES":
        return _dtype_maps()[0]
    if name == "TORCH_TO_ST":
        return _dtype_maps()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def itemsize(st_dtype: str) -> int:
    return ITEMSIZE[st_dtype]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: absolute byte range [start, end) in the file."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _dtype_maps()[0][self.dtype]


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorEntry]  # in file order (by start offset)
    metadata: dict[str, str]
    data_start: int  # 8 + header length
    file_size: int


def parse_header_length(prefix: bytes, where: str) -> int:
    """The JSON header length from the first 8 bytes, checked against MAX_HEADER_BYTES."""
    if len(prefix) < 8:
        raise DowserError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise DowserError(f"{where}: safetensors header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n < 2:
        raise DowserError(f"{where}: safetensors header length {n} is too small")
    return n


def parse_header(raw: bytes, file_size: int, where: str) -> Header:
    """Validate a JSON header against the file size: dtypes, shapes, sizes, ranges, overlaps."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DowserError(f"{where}: safetensors header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise DowserError(f"{where}: safetensors header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise DowserError(f"{where}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    if data_size < 0:
        raise DowserError(f"{where}: truncated: file is shorter than its header")
    entries = []
    for name, spec in doc.items():
        if not isinstance(spec, dict):
            raise DowserError(f"{where}: tensor {name!r} has no dtype/shape/data_offsets")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise DowserError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise DowserError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise DowserError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
        expected = math.prod(shape) * itemsize(dtype)
        if offsets[1] - offsets[0] != expected:
            raise DowserError(
                f"{where}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but "
                f"{dtype}{list(shape)} needs {expected}"
            )
        if offsets[1] > data_size:
            raise DowserError(
                f"{where}: truncated or lying header: tensor {name!r} ends at byte {offsets[1]} "
                f"of a {data_size}-byte data area"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]))
    entries.sort(key=lambda e: (e.start, e.end))
    for prev, cur in zip(entries, entries[1:]):
        if cur.start < prev.end:
            raise DowserError(f"{where}: tensors {prev.name!r} and {cur.name!r} overlap")
    return Header({e.name: e for e in entries}, metadata, data_start, file_size)


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of a local safetensors file (reads only the header)."""
    where = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = parse_header_length(f.read(8), where)
            if 8 + n > size:
                raise DowserError(f"{where}: truncated: header claims {n} bytes, file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise DowserError(f"{where}: cannot read ({e.strerror or e})") from None
    return parse_header(raw, size, where)


def tensor_from_bytes(buf: bytes | bytearray | memoryview, entry: TensorEntry) -> torch.Tensor:
    """A tensor over a copy of `buf` (which holds exactly the entry's bytes)."""
    import torch

    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    t = torch.frombuffer(bytearray(buf), dtype=entry.torch_dtype)
    return t.reshape(entry.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a tensor (contiguous, CPU), without a copy where possible."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def _preallocate(f, size: int) -> None:
    """Reserve the file's blocks before writing (posix_fallocate). On ext4 this makes writing new
    data several times faster than letting each page be allocated as it is written (measured here:
    850 MB in 0.2 s instead of 1.9 s); a filesystem without it just skips the reservation."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except (AttributeError, OSError):
        pass


class StreamingWriter:
    """Write a safetensors file header-first, then tensors one by one in header order.

    The header is fixed up front from (name, dtype, shape) triples, so peak memory
    is one tensor, not one shard. Writes go to `path` directly: callers write into a
    temporary folder and rename it into place (see `outputs.py`).
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[tuple[str, str, tuple[int, ...]]], metadata=None):
        self.path = str(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._order: list[tuple[str, str, tuple[int, ...], int]] = []
        offset = 0
        for name, dtype, shape in specs:
            if name in header:
                raise ValueError(f"duplicate tensor name {name!r}")
            nbytes = math.prod(shape) * itemsize(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # align the data area to 8 bytes, as safetensors does
        self.data_size = offset
        self._file: BinaryIO = open(self.path, "wb")
        _preallocate(self._file, 8 + len(raw) + offset)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    @property
    def expected_name(self) -> str | None:
        return self._order[self._next][0] if self._next < len(self._order) else None

    def write(self, name: str, data: torch.Tensor | bytes | memoryview) -> None:
        """Append the next tensor (a tensor of the declared dtype and shape, or its raw bytes)."""
        exp_name, dtype, shape, nbytes = self._order[self._next]
        if name != exp_name:
            raise ValueError(f"expected tensor {exp_name!r} next, got {name!r}")
        torch = sys.modules.get("torch")  # without torch imported, `data` cannot be a tensor
        if torch is not None and isinstance(data, torch.Tensor):
            if _dtype_maps()[1].get(data.dtype) != dtype or tuple(data.shape) != shape:
                raise ValueError(f"{name}: got {data.dtype}{list(data.shape)}, header says {dtype}{list(shape)}")
            data = tensor_bytes(data)
        if len(data) != nbytes:
            raise ValueError(f"{name}: got {len(data)} bytes, header says {nbytes}")
        self._file.write(data)
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        missing = [n for n, *_ in self._order[self._next :]]
        self._file.close()
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} tensors never written, first {missing[0]!r}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._file.close()


# ---- weight fingerprints (the probe records them; merge and protect check them) --------------------------------
FINGERPRINT_SAMPLE = 1 << 16  # bytes of a weight's strided sample that its fingerprint hashes


def weight_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 (hex) of a strided sample of a weight's stored bytes: every ceil(nbytes / 65536)-th
    byte of the contiguous tensor, in the dtype it is stored in. Recorded by the probe per scored
    tensor (`tensor_info` "fingerprint") so that merge can tell a BASE that is not the model the
    mask was probed on, whatever its name or path (docs/FORMAT.md)."""
    import hashlib

    import torch

    raw = weight.detach().contiguous().reshape(-1).view(torch.uint8)
    step = max(1, -(-raw.numel() // FINGERPRINT_SAMPLE))
    return hashlib.sha256(raw[::step].contiguous().numpy().tobytes()).hexdigest()


def fingerprint_agrees(weight: torch.Tensor, expected: str) -> bool:
    """Whether `weight` has the fingerprint `expected` (`weight_fingerprint`) in its own dtype or a float
    dtype checkpoints are stored in (the model may be loaded upcast)."""
    import torch

    w = weight.detach()
    for dtype in dict.fromkeys((w.dtype, torch.bfloat16, torch.float16, torch.float32)):
        try:
            if weight_fingerprint(w.to(dtype).cpu()) == expected:
                return True
        except (RuntimeError, TypeError):
            continue
    return False
