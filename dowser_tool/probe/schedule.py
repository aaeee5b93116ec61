"""How passes are scheduled: probe batches, how many fit one pass (the activation budget), where
one pass keeps its layer inputs (`ActivationStore`), and the state `--resume` continues from
(`ResumeState`). What a pass computes is `passes`; the loop over passes is `ProbeRun.collect`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import DowserError


class ActivationStore:
    """Layer inputs of the probe batches in one pass: in RAM, or spilled to temporary files."""

    def __init__(self, spill: bool):
        import tempfile

        self.spill = spill
        self._items: dict = {}
        self._dir = tempfile.mkdtemp(prefix="dowser-activations-") if spill else None

    def put(self, b: int, i: int, t: torch.Tensor) -> None:
        if self.spill:
            path = f"{self._dir}/{b}-{i}.pt"
            torch.save(t.detach().cpu(), path)
            self._items[(b, i)] = (path, t.device)
        else:
            self._items[(b, i)] = t.detach()

    def get(self, b: int, i: int) -> torch.Tensor:
        item = self._items[(b, i)]
        if self.spill:
            path, device = item
            return torch.load(path, mmap=True, weights_only=True).to(device)
        return item.detach()

    def drop(self, b: int, i: int) -> None:
        item = self._items.pop((b, i), None)
        if self.spill and item is not None:
            Path(item[0]).unlink(missing_ok=True)

    def close(self) -> None:
        self._items.clear()
        if self._dir:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)


class ResumeState:
    """`OUT.resume`: the probe tokens and the statistics of every finished probe batch.

    Written atomically after every pass; `--resume` continues from it and gives a
    sidecar byte-identical to an uninterrupted run. Removed when the sidecar is written.
    """

    def __init__(self, path: Path, fingerprint: dict):
        import hashlib

        self.path = Path(path)
        self.fingerprint = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, tokens, psi: dict, a: dict, done: int) -> None:
        from ..io.outputs import atomic_file
        from ..io.layout import TORCH_TO_ST, StreamingWriter

        tensors = {"tokens": tokens.long().contiguous()}
        for n in sorted(psi):
            tensors[f"psi/{n}"] = torch.stack(psi[n]).float().contiguous()
            tensors[f"a/{n}"] = torch.stack(a[n]).float().contiguous()
        specs = [(k, TORCH_TO_ST[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
        with atomic_file(self.path) as tmp:
            with StreamingWriter(tmp, specs, {"fingerprint": self.fingerprint, "done": str(done)}) as w:
                for k, t in tensors.items():
                    w.write(k, t)

    def load(self):
        from safetensors import safe_open

        from ..io.layout import read_header

        meta = read_header(self.path).metadata
        if meta.get("fingerprint") != self.fingerprint:
            raise DowserError(f"{self.path}: resume state is from a run with other settings or another model")
        psi, a = {}, {}
        with safe_open(str(self.path), framework="pt") as f:
            tokens = f.get_tensor("tokens")
            for key in f.keys():
                kind, _, name = key.partition("/")
                if kind in ("psi", "a"):
                    (psi if kind == "psi" else a)[name] = list(f.get_tensor(key))
        return tokens, psi, a, int(meta["done"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def split_batches(count: int, batch_size: int) -> list[tuple[int, slice]]:
    """The probe batches of `count` sequences: (batch index, rows), the last one possibly shorter."""
    return [(b, slice(i, min(i + batch_size, count))) for b, i in enumerate(range(0, count, batch_size))]


def batches_per_pass(count: int, length: int, batch_size: int, n_layers: int, hidden: int, dtype: torch.dtype,
                     budget: int) -> tuple[int, bool]:
    """How many probe batches' layer inputs (`n_layers` + 1 per batch, `length` tokens of `hidden`
    values in `dtype`) fit `budget` bytes at once (at least 1), and whether one batch alone
    exceeds it (the store then spills to disk)."""
    per_batch = (n_layers + 1) * batch_size * length * hidden
    per_batch *= torch.empty((), dtype=dtype).element_size()
    return max(1, min(math.ceil(count / batch_size), budget // max(per_batch, 1))), per_batch > budget
