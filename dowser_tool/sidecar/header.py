"""What a sidecar's header says, checked, without torch: the format constants, the metadata and
shapes, which statistics the file holds, the roles of its masks, and the packed mask bytes.

`Sidecar` (`file`) builds on `SidecarHeader` to read tensors; `dowser inspect` (`summary`) needs
only this, so it starts without importing torch (docs/FORMAT.md for the format).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import DowserError
from ..io.layout import read_header

FORMAT_NAME = "dowser-mask"
FORMAT_VERSION = 2  # 2: adds the `roles` metadata; version 1 files are still read (roles inferred)
SUFFIX = ".dowser.safetensors"
OUTPUT_HEAD, INPUT_EMBEDDING = "output_head", "input_embedding"
ROLES = (OUTPUT_HEAD, INPUT_EMBEDDING)

# Full score matrices (`score/<name>`) are kept in the dtype they came in; cutting reads them as float32.
SCORE_DTYPES = ("F32", "BF16", "F16")


def _checked_roles(roles, names, where: str) -> dict[str, str]:
    if not isinstance(roles, dict):
        raise DowserError(f"{where}: roles must be a JSON object {{mask name: role}}")
    for name, role in roles.items():
        if name not in names:
            raise DowserError(f"{where}: roles names {name!r}, which has no mask")
        if role not in ROLES:
            raise DowserError(f"{where}: role {role!r} of {name!r} is not one of {', '.join(ROLES)}")
    return dict(roles)


class SidecarHeader:
    """The checked header of a local sidecar file `path` (nothing else is read, torch is not needed).

    Attributes: `path`, `metadata` (JSON values decoded), `shapes` (mask name -> shape), `version`,
    `has_factors` (psi/a statistics), `has_scores` (full score matrices), `has_stats` (either).
    Raises DowserError (one line) for a missing, foreign, newer or inconsistent file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = str(self.path)
        if not self.path.is_file():
            raise DowserError(f"{where}: no such file")
        header = read_header(self.path)
        self.version = self._checked_version(header.metadata, where)
        self.metadata: dict = {}
        for key, value in header.metadata.items():
            try:
                self.metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                self.metadata[key] = value
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in self.metadata.get("tensors", {}).items()}
        for name, shape in self.shapes.items():
            entry = header.tensors.get(f"mask/{name}")
            if entry is None or entry.dtype != "U8" or entry.numel != (math.prod(shape) + 7) // 8:
                raise DowserError(f"{where}: mask of {name!r} is missing or has the wrong size for shape {list(shape)}")
        self.has_factors = bool(self.metadata.get("has_stats")) and "stats/update_weights" in header.tensors
        self.has_scores = self.metadata.get("has_scores") is True
        if self.has_scores:
            self._check_scores(header, where)
        self.has_stats = self.has_factors or self.has_scores
        self._keys = set(header.tensors)
        self._entries = header.tensors
        recorded = _checked_roles(self.metadata.get("roles", {}), self.shapes, where) if self.version >= 2 else {}
        self._recorded_roles = recorded

    @staticmethod
    def _checked_version(meta: dict[str, str], where: str) -> int:
        if meta.get("format") != FORMAT_NAME:
            raise DowserError(f"{where}: not a dowser sidecar (format {meta.get('format')!r})")
        try:
            version = int(meta.get("format_version", ""))
        except ValueError:
            raise DowserError(f"{where}: unreadable format_version {meta.get('format_version')!r}") from None
        if version > FORMAT_VERSION:
            raise DowserError(
                f"{where}: format version {version} is newer than this tool reads ({FORMAT_VERSION}); upgrade dowser-tool"
            )
        return version

    def _check_scores(self, header, where: str) -> None:
        if self.has_factors:
            raise DowserError(f"{where}: holds both score statistics (psi/, a/) and full scores (score/); "
                              "a sidecar holds one or the other")
        for name, shape in self.shapes.items():
            entry = header.tensors.get(f"score/{name}")
            if entry is None or entry.dtype not in SCORE_DTYPES or tuple(entry.shape) != shape:
                raise DowserError(f"{where}: score of {name!r} is missing or is not an "
                                  f"{'/'.join(SCORE_DTYPES)} tensor of shape {list(shape)}")

    def _inferred_roles(self) -> dict[str, str]:
        """Roles told by names alone: a mask on the head is the head's; one on the input embedding
        is the embedding's, except in version 1 files probed with `--include lm_head`: the probe never
        scores the input embedding, so there it is a tied head stored under the embedding's name."""
        from ..model.keys import KeyRules

        try:
            rules = KeyRules.of_config({"model_type": self.metadata.get("architecture")}, str(self.path))
        except DowserError:
            return {}
        if not rules.known:
            return {}  # a family transformers does not know: no roles by name
        tied_head = self.version < 2 and "lm_head" in (self.metadata.get("include") or [])
        roles = {}
        for name in self.shapes:
            canon = rules.canonical(name)
            if canon == rules.head:
                roles[name] = OUTPUT_HEAD
            elif canon == rules.embed:
                roles[name] = OUTPUT_HEAD if tied_head else INPUT_EMBEDDING
        return roles

    @property
    def roles(self) -> dict[str, str]:
        """Mask name -> OUTPUT_HEAD / INPUT_EMBEDDING: recorded (version 2), else inferred (version 1)."""
        if not hasattr(self, "_roles"):
            inferred = self._inferred_roles() if self.version < 2 else {}  # version 2 records them
            self._roles = {**inferred, **self._recorded_roles}
        return self._roles

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def mask_bytes(self, name: str) -> bytes:
        """The mask of `name` as stored, as bytes: ceil(numel / 8), most significant bit first,
        1 = protected (the header has checked the range against the file's size)."""
        entry = self._entries[f"mask/{name}"]
        with open(self.path, "rb") as f:
            f.seek(entry.start)
            return f.read(entry.nbytes)

    def protected_count(self, name: str) -> int:
        """How many entries of the mask of `name` are protected (set bits), counted without torch."""
        return count_bits(self.mask_bytes(name), math.prod(self.shapes[name]))


_CHUNK = 1 << 20  # bytes counted at a time: a big int of 1 MiB, not one of the whole mask


def count_bits(packed: bytes, n: int) -> int:
    """Set bits among the first `n` bits of `packed` (MSB first; the padding of the last byte is
    not counted, as `unpack_bits` drops it)."""
    full, rest = divmod(n, 8)
    view = memoryview(packed)
    count = sum(int.from_bytes(view[i : min(i + _CHUNK, full)], "big").bit_count() for i in range(0, full, _CHUNK))
    if rest:
        count += (packed[full] >> (8 - rest)).bit_count()
    return count
