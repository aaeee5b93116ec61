"""The mask sidecar, `NAME.dowser.safetensors` (specified in docs/FORMAT.md).

A plain safetensors file:
- `mask/<name>`: U8, ceil(numel/8) bytes, the protected-entry mask of weight
  <name> (a checkpoint tensor name of the base model), row-major, packed 8 per
  byte most-significant bit first (numpy.packbits order), 1 = protected.
- optional statistics: `psi/<name>` F32 (U, out), `a/<name>` F32 (U, in), and
  `stats/update_weights` F32 (U,); score = |W| (.) Psi^T diag(w) A / sum(w).
- optional full score matrices `score/<name>` F32/BF16/F16 (the weight's shape), instead of
  psi/a: scores imported from the released Model-Dowser scripts (`dowser import-scores`);
  re-cutting uses them as they are.
- optional `probe/token_ids` I64 (K, T): the probe sequences used.
- string metadata: format, format_version, provenance and settings (JSON values),
  and (version 2) `roles`: which masks belong to the output head or input
  embedding, since a tied head is stored under the embedding's name.

A sidecar may live on the Hugging Face Hub: `resolve_sidecar` (`resolve`, re-exported here) turns
a reference (a local path, `REPO_ID` or `REPO_ID/FILE`) into a local file, and every reader goes
through it. The header checks are `SidecarHeader`'s (`header`, torch-free), which `Sidecar` extends.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import DowserError
from ..io.outputs import atomic_file
from ..io.layout import FINGERPRINT_SAMPLE, TORCH_TO_ST, StreamingWriter, weight_fingerprint  # noqa: F401
from ..score import cut_mask, score_matrix, validate_ratio
from .header import (  # noqa: F401  (the format's names, here since 0.1)
    FORMAT_NAME, FORMAT_VERSION, INPUT_EMBEDDING, OUTPUT_HEAD, ROLES, SCORE_DTYPES, SUFFIX, SidecarHeader,
    _checked_roles)
from .resolve import _hub_reference, _single_sidecar, resolve_sidecar  # noqa: F401  (found here since 0.1)

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> U8 (ceil(numel/8),), row-major, MSB first, zero-padded."""
    import numpy as np

    flat = mask.detach().reshape(-1).to("cpu", torch.bool).contiguous()
    return torch.from_numpy(np.packbits(flat.numpy()))  # big-endian bit order: MSB first


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of pack_bits: U8 bytes -> Bool tensor of `shape`."""
    n = math.prod(shape)
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {n} bits")
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS).ne(0).reshape(-1)[:n]
    return bits.reshape(tuple(shape))


class _Packed:
    """What a bit-packed mask offers, from its `bits` (U8) and `shape`."""

    def unpack(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def protected(self) -> int:
        return int(self.unpack().sum())


@dataclass(frozen=True)
class PackedMask(_Packed):
    """A mask already bit-packed (1/8 byte per entry): what a probe keeps while it cuts many masks."""

    bits: torch.Tensor
    shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: torch.Tensor) -> "PackedMask":
        return cls(pack_bits(mask), tuple(mask.shape))


class SpilledMask(_Packed):
    """A packed mask kept in a `MaskSpill` file instead of memory; reads its bits on demand."""

    def __init__(self, spill: "MaskSpill", offset: int, nbytes: int, shape: tuple[int, ...]):
        self._spill, self._offset, self._nbytes, self.shape = spill, offset, nbytes, tuple(shape)

    @property
    def bits(self) -> torch.Tensor:
        return self._spill.read(self._offset, self._nbytes)


class MaskSpill:
    """Packed masks written to a temporary file as they are cut, so that memory holds one mask, not
    numel/8 bytes for the whole model (1.6 GB for a 13B model). The file has no name (it is gone
    when closed, or when the process ends however it ends)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        import tempfile

        self._file = tempfile.TemporaryFile(dir=folder)
        self._size = 0

    def add(self, mask: PackedMask) -> SpilledMask:
        data = mask.bits.numpy().tobytes()
        self._file.seek(self._size)
        self._file.write(data)
        handle = SpilledMask(self, self._size, len(data), mask.shape)
        self._size += len(data)
        return handle

    def read(self, offset: int, nbytes: int) -> torch.Tensor:
        self._file.flush()
        return torch.frombuffer(bytearray(os.pread(self._file.fileno(), nbytes, offset)), dtype=torch.uint8)

    def close(self) -> None:
        self._file.close()


@dataclass
class SidecarData:
    """Everything a sidecar holds, in memory (masks may be spilled to a file: `SpilledMask`)."""

    masks: dict[str, torch.Tensor | PackedMask]  # name -> Bool (True = protected) or packed
    psi: dict[str, torch.Tensor] = field(default_factory=dict)
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    update_weights: torch.Tensor | None = None
    probe_tokens: torch.Tensor | None = None
    info: dict = field(default_factory=dict)  # provenance and settings (JSON-able values)
    roles: dict[str, str] = field(default_factory=dict)  # mask name -> OUTPUT_HEAD or INPUT_EMBEDDING
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> full score matrix (instead of psi/a)


def _check_finite(path, tensors: dict) -> None:
    """No sidecar is ever written from non-finite statistics or scores (NaN would rank as +inf and
    still give a mask of exactly the claimed ratio): DowserError naming the first such tensor."""
    for key, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise DowserError(f"{path}: {key} holds {bad} non-finite values (an overflow while probing?); "
                              "no sidecar written: probe again with --dtype float32")


def write_sidecar(path: str | os.PathLike, data: SidecarData) -> Path:
    """Write atomically; names and metadata keys are sorted so equal inputs give byte-identical
    files (safetensors' own save_file orders metadata by hash, differently on every run)."""
    tensors: dict[str, torch.Tensor] = {}  # values may be callables that produce the tensor when written
    shapes, specs = {}, {}
    for name in sorted(data.masks):
        m = data.masks[name]
        packed = m if isinstance(m, (PackedMask, SpilledMask)) else PackedMask.of(m)
        shapes[name] = list(packed.shape)
        tensors[f"mask/{name}"] = (lambda p=packed: p.bits) if isinstance(packed, SpilledMask) else packed.bits
        specs[f"mask/{name}"] = ("U8", ((math.prod(packed.shape) + 7) // 8,))
    if data.psi:
        if data.update_weights is None:
            raise ValueError("statistics need update_weights")
        for name in sorted(data.psi):
            tensors[f"psi/{name}"] = data.psi[name].detach().to("cpu", torch.float32).contiguous()
            tensors[f"a/{name}"] = data.a[name].detach().to("cpu", torch.float32).contiguous()
        tensors["stats/update_weights"] = data.update_weights.detach().to("cpu", torch.float32).contiguous()
    if data.scores:
        if data.psi:
            raise ValueError("a sidecar holds score statistics (psi/a) or full scores, not both")
        if set(data.scores) != set(data.masks):
            raise ValueError("full scores must be given for every mask")
        for name in sorted(data.scores):
            score = data.scores[name].detach().to("cpu").contiguous()
            if TORCH_TO_ST.get(score.dtype) not in SCORE_DTYPES or tuple(score.shape) != tuple(shapes[name]):
                raise ValueError(f"score of {name!r} must be float32, bfloat16 or float16 of shape {shapes[name]}")
            tensors[f"score/{name}"] = score
    _check_finite(path, tensors)
    if data.probe_tokens is not None:
        tensors["probe/token_ids"] = data.probe_tokens.detach().to("cpu", torch.int64).contiguous()
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "tool_version": __version__,
        "tensors": json.dumps(shapes, sort_keys=True),
        "has_stats": json.dumps(bool(data.psi)),
        "roles": json.dumps(_checked_roles(data.roles, data.masks, str(path)), sort_keys=True),
    }
    if data.scores:  # written only when true, so that sidecars without scores stay byte-identical to before
        meta["has_scores"] = "true"
    for key, value in sorted(data.info.items()):
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    path = Path(path)
    specs = [(name, *(specs.get(name) or (TORCH_TO_ST[t.dtype], tuple(t.shape)))) for name, t in tensors.items()]
    with atomic_file(path) as tmp:
        with StreamingWriter(tmp, specs, dict(sorted(meta.items()))) as writer:
            for name, t in tensors.items():
                writer.write(name, t() if callable(t) else t)
    return path


class Sidecar(SidecarHeader):
    """A sidecar opened for reading; tensors are read lazily (memory-mapped).

    `path`: a local file or folder, or a Hub reference `REPO_ID` / `REPO_ID/FILE` at `revision`
    (see `resolve_sidecar`, which downloads it into the HF cache); `self.path` is the local file.

    `roles` maps each mask of the output head or input embedding to its role (OUTPUT_HEAD,
    INPUT_EMBEDDING): recorded by version 2 writers, inferred for version 1 files (see
    `_inferred_roles`). Masks of other weights have no role and are matched by name.

    Scores come from one of two sources (docs/FORMAT.md): rank-U statistics psi/a
    (`has_factors`, what `dowser probe` saves) or full score matrices `score/<name>`
    (`has_scores`, what `dowser import-scores` stores). `has_stats` is true when either is
    there, i.e. when masks can be re-cut at another ratio. Raises DowserError (one line) for a
    missing, foreign, newer or inconsistent file.
    """

    def __init__(self, path: str | os.PathLike, revision: str | None = None):
        super().__init__(resolve_sidecar(path, revision))

    def _get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def mask(self, name: str) -> torch.Tensor:
        return unpack_bits(self.packed_mask(name), self.shapes[name])

    def packed_mask(self, name: str) -> torch.Tensor:
        """The mask of `name` as stored: U8 (ceil(numel / 8),), most significant bit first, 1 = protected."""
        return self._get(f"mask/{name}")

    def masks(self) -> dict[str, torch.Tensor]:
        return {n: self.mask(n) for n in self.names}

    def stats(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(psi (U, out), a (U, in), update weights (U,)) for one weight."""
        if self.has_scores:
            raise DowserError(f"{self.path}: holds full score matrices (imported scores), not psi/a statistics")
        if not self.has_stats:
            raise DowserError(f"{self.path}: holds no score statistics (probed with --no-save-stats)")
        return self._get(f"psi/{name}"), self._get(f"a/{name}"), self._get("stats/update_weights")

    def probe_tokens(self) -> torch.Tensor | None:
        return self._get("probe/token_ids") if "probe/token_ids" in self._keys else None

    def fingerprint(self, name: str) -> str | None:
        """`weight_fingerprint` of the base weight `name` was probed on (None in older sidecars)."""
        return ((self.metadata.get("tensor_info") or {}).get(name) or {}).get("fingerprint")

    def transposed(self, name: str) -> bool:
        """Whether `name` is stored (in, out), as transformers' Conv1D (GPT-2) stores its weights
        (`tensor_info` layout "in_out"; masks and statistics then follow that layout)."""
        info = (self.metadata.get("tensor_info") or {}).get(name) or {}
        return info.get("layout") == "in_out"

    def score(self, name: str, weight: torch.Tensor | None) -> torch.Tensor:
        """The Dowser score of `name` (float32, its stored shape): the stored full score matrix when
        the sidecar holds one (`weight` is then not needed), else |W| (.) Psi^T diag(w) A / sum(w)
        from the statistics and the base weight (`scoring.score_matrix`)."""
        if self.has_scores:
            return self._get(f"score/{name}").float()
        if weight is None:
            raise DowserError(f"{self.path}: scoring {name!r} from statistics needs the base weight")
        psi, a, w = self.stats(name)
        return score_matrix(weight, psi, a, w, transposed=self.transposed(name))

    def recut(self, name: str, weight: torch.Tensor | None, update_ratio: float) -> torch.Tensor:
        """The protected mask of `name` at another update ratio (`scoring.cut_mask`: exactly
        round(ratio * numel) entries trainable, ties by index), from the stored scores, or from the
        statistics and the base weight `weight` (checked against the mask's shape when given)."""
        if weight is not None and tuple(weight.shape) != self.shapes[name]:
            raise DowserError(
                f"{self.path}: {name!r} has shape {list(self.shapes[name])} in the mask but "
                f"{list(weight.shape)} in the model"
            )
        return cut_mask(self.score(name, weight), update_ratio)

    def read_all(self) -> SidecarData:
        data = SidecarData(masks=self.masks(), probe_tokens=self.probe_tokens(), roles=dict(self.roles))
        if self.has_factors:
            for n in self.names:
                data.psi[n], data.a[n], data.update_weights = self.stats(n)
        if self.has_scores:
            data.scores = {n: self._get(f"score/{n}") for n in self.names}
        skip = {"format", "format_version", "tool_version", "tensors", "has_stats", "has_scores", "roles"}
        data.info = {k: v for k, v in self.metadata.items() if k not in skip}
        return data


def default_sidecar_name(model: str) -> str:
    """`org/name` or a folder path -> `name.dowser.safetensors`."""
    return Path(str(model).rstrip("/")).name + SUFFIX


def load_mask(path, update_ratio: float | None = None, base=None, *, revision: str | None = None
              ) -> dict[str, torch.Tensor]:
    """The protected-entry masks of a sidecar, keyed by checkpoint tensor name (True = protected).

    `path`: a local file, a `Sidecar`, or a Hub reference `REPO_ID` / `REPO_ID/FILE` at
    `revision` (downloaded into the HF cache, `resolve_sidecar`). Masks are Bool tensors of
    each weight's shape.

    With `update_ratio`, re-cut every mask at that ratio (exactly round(ratio * numel)
    trainable entries per matrix, `scoring.cut_mask`): from stored full scores as they are, or
    from the saved statistics and the base weights: `base` is a folder, Hub repo id or
    `Checkpoint`; by default the base model (id and commit) recorded in the sidecar.
    Raises DowserError when the sidecar holds neither statistics nor scores.
    """
    sidecar = path if isinstance(path, Sidecar) else Sidecar(path, revision)
    if update_ratio is None:
        return sidecar.masks()
    update_ratio = validate_ratio(update_ratio)
    if not sidecar.has_stats:
        raise DowserError(f"{sidecar.path}: cannot re-cut at update ratio {update_ratio}: no statistics saved")
    if sidecar.has_scores and base is None:  # the scores already hold |W|: no base weights needed
        return {name: sidecar.recut(name, None, update_ratio) for name in sidecar.names}
    ckpt = open_base(sidecar, base)
    from ..model.keys import KeyRules, NameMap

    rules = KeyRules.of_config(ckpt.config or {}, f"{ckpt.where}/config.json")
    nm = NameMap(ckpt.tensor_names(), rules, ckpt.where)
    out = {}
    for name in sidecar.names:
        ckpt_name = nm.to_checkpoint(rules.canonical(name))
        out[name] = sidecar.recut(name, ckpt.read(ckpt_name), update_ratio)
    return out


def recut_sidecar(path, update_ratio: float, out, *, base=None, force: bool = False,
                  revision: str | None = None) -> Path:
    """Write a copy of a sidecar (local, or a Hub reference at `revision`) whose masks are re-cut
    at `update_ratio` (statistics or scores kept). Never overwrites `out` without `force`."""
    from ..io.outputs import check_destination

    sidecar = Sidecar(path, revision)
    dest = check_destination(out, force, inputs=[sidecar.path])
    data = sidecar.read_all()
    data.masks = load_mask(sidecar, update_ratio, base)
    data.info["update_ratio"] = validate_ratio(update_ratio)
    return write_sidecar(dest, data)


def open_base(sidecar: Sidecar, base=None):
    """The base checkpoint for re-cutting: `base` if given, else the one the sidecar records."""
    from ..io.checkpoint import Checkpoint, open_checkpoint

    if isinstance(base, Checkpoint):
        return base
    if base is not None:
        return open_checkpoint(base)
    rec = sidecar.metadata.get("base_model") or {}
    if not rec.get("id"):
        raise DowserError(f"{sidecar.path}: records no base model; pass base=")
    if Path(rec["id"]).is_dir():
        return open_checkpoint(rec["id"])
    return open_checkpoint(rec["id"], rec.get("sha") or rec.get("revision"))
