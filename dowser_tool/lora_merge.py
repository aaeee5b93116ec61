"""PEFT LoRA adapters merged into base weights one tensor at a time, without peft.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`
with keys `base_model.model.<module>.lora_A.weight` (r, in) and `lora_B.weight`
(out, r). The merged weight is the one `merge_and_unload` gives:

    W' = W + scale * B @ A      (transposed for fan_in_fan_out and for embeddings)

with scale = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA, where r and
alpha may be overridden per module by `rank_pattern` / `alpha_pattern`. As in
PEFT, the delta is computed in float32 and added in the weight's own dtype.
Other adapter tensors (modules_to_save, saved embeddings) replace the base
tensor whole.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .errors import DowserError
from .names import Architecture, canonical_name, lora_target

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(ckpt: Checkpoint) -> bool:
    return ADAPTER_CONFIG in ckpt.files()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first key that equals the module name or matches a dotted suffix of it."""
    for key, value in patterns.items():
        if key == module or re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraPair:
    a: str  # adapter tensor names
    b: str
    scale: float
    transpose: bool


class LoraAdapter:
    """The adapter's effect on each base tensor, by canonical name."""

    def __init__(self, ckpt: Checkpoint, arch: Architecture):
        self.ckpt = ckpt
        where = f"{ckpt.where}/{ADAPTER_CONFIG}"
        try:
            cfg = json.loads(ckpt.read_text(ADAPTER_CONFIG) or "")
        except json.JSONDecodeError as e:
            raise DowserError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(cfg, dict):
            raise DowserError(f"{where}: not a JSON object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise DowserError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
        if cfg.get("use_dora"):
            raise DowserError(f"{where}: DoRA adapters are not supported; merge them with peft first")
        try:
            r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
        except (KeyError, TypeError, ValueError):
            raise DowserError(f"{where}: needs an integer 'r' and a numeric 'lora_alpha'") from None
        self.config = cfg
        self.base_model = cfg.get("base_model_name_or_path")
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        fan_in_fan_out, rslora = bool(cfg.get("fan_in_fan_out")), bool(cfg.get("use_rslora"))

        parts: dict[str, dict[str, str]] = {}
        modules: dict[str, str] = {}
        self.replacements: dict[str, str] = {}  # canonical -> adapter tensor replacing it whole
        for key in ckpt.tensor_names():
            if "lora_magnitude_vector" in key:
                raise DowserError(f"{ckpt.where}: {key!r} is a DoRA magnitude; DoRA adapters are not supported")
            hit = lora_target(key, arch)
            if hit is None:
                plain = key.replace(".modules_to_save.", ".").replace(".original_module.", ".")
                self.replacements[canonical_name(plain, arch)] = key
                continue
            canon, part, module = hit
            if part in parts.setdefault(canon, {}):
                raise DowserError(f"{ckpt.where}: {key!r} and {parts[canon][part]!r} adapt the same weight")
            parts[canon][part] = key
            modules[canon] = module
        self.pairs: dict[str, LoraPair] = {}
        for canon, got in parts.items():
            embedding = "embedding_A" in got or "embedding_B" in got
            a, b = (got.get("embedding_A"), got.get("embedding_B")) if embedding else (got.get("A"), got.get("B"))
            if a is None or b is None:
                raise DowserError(f"{ckpt.where}: {modules[canon]!r} has only one of its lora_A/lora_B matrices")
            rank = int(_pattern_value(rank_pattern, modules[canon], r))
            mod_alpha = float(_pattern_value(alpha_pattern, modules[canon], alpha))
            if ckpt.shape(a)[0] != rank or ckpt.shape(b)[-1] != rank:
                raise DowserError(
                    f"{ckpt.where}: {modules[canon]!r} has lora_A {list(ckpt.shape(a))} and lora_B "
                    f"{list(ckpt.shape(b))}, but adapter_config.json gives it rank {rank}"
                )
            scale = mod_alpha / (math.sqrt(rank) if rslora else rank)
            self.pairs[canon] = LoraPair(a, b, scale, transpose=embedding or fan_in_fan_out)
        both = set(self.pairs) & set(self.replacements)
        if both:
            raise DowserError(f"{ckpt.where}: {sorted(both)[0]!r} is both LoRA-adapted and replaced whole")

    def check_shape(self, canonical: str, base_shape: tuple[int, ...]) -> None:
        """Refuse an adapter whose update does not fit the base weight, before anything is written."""
        pair = self.pairs.get(canonical)
        if pair is None:
            return
        shape = (self.ckpt.shape(pair.b)[0], self.ckpt.shape(pair.a)[1])
        if pair.transpose:
            shape = shape[::-1]
        if shape != tuple(base_shape):
            raise DowserError(
                f"{self.ckpt.where}: the adapter's update of {canonical!r} has shape {list(shape)}, "
                f"the base weight {list(base_shape)}: is this adapter for this base model?"
            )

    def touches(self, canonical: str) -> bool:
        return canonical in self.pairs or canonical in self.replacements

    def apply(self, canonical: str, weight: torch.Tensor) -> torch.Tensor:
        """The fine-tuned value of one base tensor (returned unchanged if the adapter leaves it)."""
        if canonical in self.replacements:
            return self.ckpt.read(self.replacements[canonical])
        pair = self.pairs.get(canonical)
        if pair is None:
            return weight
        ab = self.ckpt.read_many([pair.a, pair.b])
        delta = ab[pair.b].float() @ ab[pair.a].float()
        if pair.transpose:
            delta = delta.T
        return weight + (delta * pair.scale).to(weight.dtype)
