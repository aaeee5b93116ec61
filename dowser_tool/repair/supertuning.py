"""peft Super-Tuning sparse adapters merged into base weights one tensor at a time, without peft.

An adapter folder with `adapter_config.json` `peft_type: "SUPERTUNING"` (written by peft's
`SupertuningConfig` tuner, e.g. by `dowser sparse-adapter` / `dowser_tool.train.sparse`) holds,
per adapted `nn.Linear`, `base_model.model.<module>.supertuning_indices` (int32 flat, row-major
positions into the weight) and `base_model.model.<module>.supertuning_values` (float32). The
merged weight is the one peft's `merge_and_unload` gives (`supertuning/layer.py`, `Linear.merge`):

    W.reshape(-1).scatter_add_(0, indices, values.to(W.dtype))

in the weight's own dtype, so repeated indices are added (each in turn), entries not indexed keep
BASE's bits. Refused, each by name: Supra mode (a LoRA beside the sparse values, `r` set), adapters
saved without their indices (`save_precomputed_indices=false`: peft re-derives them from BASE's
magnitudes at load), and any other tensor in the file (modules_to_save copies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import DowserError
from ..io.checkpoint import ADAPTER_CONFIG, Checkpoint
from ..model.keys import KeyRules

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.supertuning_(?P<part>indices|values)(?:\.[\w-]+)?$")
_INDEX_DTYPES = (torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class SparsePart:
    indices: str  # adapter tensor names
    values: str


class SparseAdapter:
    """A Super-Tuning adapter's effect on each base tensor, by canonical name (the interface of
    `lora.LoraAdapter`: pairs, replacements, output_shape, check_shape, touches, apply)."""

    kind = "sparse-adapter"

    def __init__(self, ckpt: Checkpoint, rules: KeyRules):
        from .lora import adapter_config_json

        self.ckpt = ckpt
        cfg = self.config = adapter_config_json(ckpt)
        self.base_model = cfg.get("base_model_name_or_path")
        self.replacements: dict[str, str] = {}  # none: modules_to_save copies are refused
        self.stored_base: dict[str, str] = {}
        where = f"{ckpt.where}/{ADAPTER_CONFIG}"
        if cfg.get("r") is not None:
            raise DowserError(f"{where}: a Super-Tuning adapter in Supra mode (r={cfg.get('r')}, a LoRA beside the "
                              "sparse values) is not supported; merge it with peft (merge_and_unload)")
        if cfg.get("save_precomputed_indices") is False:
            raise DowserError(f"{where}: saved without its indices (save_precomputed_indices=false), so which entries "
                              "it changes depends on BASE's magnitudes at load; save it with save_precomputed_indices=true")
        self.pairs = self._sort_keys(rules)

    def _sort_keys(self, rules: KeyRules) -> dict[str, SparsePart]:
        ckpt, parts = self.ckpt, {}
        for key in ckpt.tensor_names():
            m = _KEY.match(key)
            if m is None:
                raise DowserError(f"{ckpt.where}: {key!r} is not a Super-Tuning index or value tensor "
                                  "(modules_to_save copies in a sparse adapter are not supported)")
            canon = rules.canonical(f"{m.group('module')}.weight")
            got = parts.setdefault(canon, {})
            if m.group("part") in got:
                raise DowserError(f"{ckpt.where}: {key!r} and {got[m.group('part')]!r} adapt the same weight")
            got[m.group("part")] = key
        if not parts:
            raise DowserError(f"{ckpt.where}: a Super-Tuning adapter with no supertuning_indices/values tensors")
        pairs = {}
        for canon, got in parts.items():
            if set(got) != {"indices", "values"}:
                raise DowserError(f"{ckpt.where}: {canon!r} has supertuning_{next(iter(got))} but no "
                                  f"supertuning_{({'indices', 'values'} - set(got)).pop()}")
            idx, val = got["indices"], got["values"]
            if ckpt.dtype(idx) not in _INDEX_DTYPES or ckpt.dtype(val) not in _VALUE_DTYPES:
                raise DowserError(f"{ckpt.where}: {idx!r} must hold integers and {val!r} floats")
            if len(ckpt.shape(idx)) != 1 or tuple(ckpt.shape(idx)) != tuple(ckpt.shape(val)):
                raise DowserError(f"{ckpt.where}: {idx!r} {list(ckpt.shape(idx))} and {val!r} "
                                  f"{list(ckpt.shape(val))} must be 1-D of one length")
            pairs[canon] = SparsePart(idx, val)
        return pairs

    def output_shape(self, canonical: str, base_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(base_shape)

    def check_shape(self, canonical: str, base_shape: tuple[int, ...]) -> None:
        """Refuse indices outside the base weight, before anything is written (they are small: read)."""
        part = self.pairs.get(canonical)
        if part is None:
            return
        idx = self.ckpt.read(part.indices)
        numel = 1
        for d in base_shape:
            numel *= d
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise DowserError(f"{self.ckpt.where}: {part.indices!r} indexes entries outside {canonical!r} "
                              f"{list(base_shape)} ({numel} entries): is this adapter for this base model?")

    def touches(self, canonical: str) -> bool:
        return canonical in self.pairs

    def apply(self, canonical: str, weight: torch.Tensor) -> torch.Tensor:
        """BASE's weight with the values added at their flat indices (peft's merge, bit for bit)."""
        part = self.pairs.get(canonical)
        if part is None:
            return weight
        t = self.ckpt.read_many([part.indices, part.values])
        out = weight.clone().contiguous()
        out.reshape(-1).scatter_add_(0, t[part.indices].to(torch.int64), t[part.values].to(out.dtype))
        return out
