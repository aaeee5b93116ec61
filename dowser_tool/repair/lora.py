"""PEFT LoRA adapters merged into base weights one tensor at a time, without peft.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`
with keys `base_model.model.<module>.lora_A.weight` (r, in) and `lora_B.weight`
(out, r). The merged weight is the one `merge_and_unload` gives:

    W' = W + scale * B @ A      (transposed for fan_in_fan_out and for embeddings)

with scale = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA, where r and
alpha may be overridden per module by `rank_pattern` / `alpha_pattern`. As in
PEFT, the delta is computed in float32 and added in the weight's own dtype.
Other adapter tensors (`modules_to_save` copies) replace the base tensor whole.
A LoRA-adapted embedding may come with its own base layer
(`<module>.base_layer.weight`, which PEFT saves when embeddings are targeted,
resized or not): the update is added to that stored layer, as `merge_and_unload`
does in the model the adapter was saved from. Adapters whose initialisation
rewrote the base layer (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) hold an update
relative to a residual, not to BASE, and are refused unless PEFT converted them.

Each update is oriented by the layout of the weight it updates, never by the adapter's single
`fan_in_fan_out` flag: PEFT keeps that flag per module (True for transformers' `Conv1D`, which
stores (in, out); False for `nn.Linear`, (out, in)) but writes one value into adapter_config.json.
The layout comes from the model class (`model.orient`), else from the sidecar's `tensor_info`,
else from the shapes; only a square weight of a family transformers does not know, with no
sidecar layout, falls back to the flag. LoRA bias (`lora_bias`), trainable tokens and expert LoRA
(`target_parameters`) are refused, each by name. `open_adapter` also opens peft Super-Tuning sparse
adapters (`repair.supertuning`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace

import torch

from ..io.checkpoint import ADAPTER_CONFIG, Checkpoint, same_bits
from ..errors import DowserError
from ..model.keys import KeyRules, peft_fold
from ..model.orient import stored_in_out

# `init_lora_weights` values that leave the base layer as it was loaded (peft/tuners/lora/layer.py,
# `LoraLayer.update_layer`): True and "gaussian" zero B; "eva" and "mica" zero one factor;
# "orthogonal" makes B @ A vanish; False is random A and B on an untouched base. Every other
# value ("pissa", "pissa_niter_N", "olora", "corda", "loftq", "lora_ga", and any later one)
# replaces the base weight by a residual W - scale * B0 @ A0, so "base + update" is not BASE + update.
BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def init_moves_base(init) -> bool:
    """Whether a LoRA `init_lora_weights` value rewrites the base layer (or is unknown, so might)."""
    if isinstance(init, bool):
        return False
    return not (isinstance(init, str) and init.lower() in BASE_PRESERVING_INITS)


def is_adapter(ckpt: Checkpoint) -> bool:
    return ADAPTER_CONFIG in ckpt.files()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first key that equals the module name or matches a dotted suffix of it."""
    for key, value in patterns.items():
        if key == module or re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return default


def adapter_config_json(ckpt: Checkpoint) -> dict:
    """`adapter_config.json` as a dict (DowserError if it is not a JSON object)."""
    where = f"{ckpt.where}/{ADAPTER_CONFIG}"
    try:
        cfg = json.loads(ckpt.read_text(ADAPTER_CONFIG) or "")
    except json.JSONDecodeError as e:
        raise DowserError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise DowserError(f"{where}: not a JSON object")
    return cfg


def open_adapter(ckpt: Checkpoint, rules: KeyRules, in_out=None):
    """The adapter in `ckpt`: a `LoraAdapter`, or a `supertuning.SparseAdapter` for peft_type SUPERTUNING.
    `in_out(canonical) -> bool | None`: a layout hint for weights the model class does not settle."""
    if adapter_config_json(ckpt).get("peft_type") == "SUPERTUNING":
        from .supertuning import SparseAdapter

        return SparseAdapter(ckpt, rules)
    return LoraAdapter(ckpt, rules, in_out)


def _refuse_features(cfg: dict, where: str) -> None:
    """LoRA features this merge does not implement, each refused by its name."""
    if cfg.get("lora_bias"):
        raise DowserError(f"{where}: LoRA bias (lora_bias=true) is not supported; merge the adapter with peft "
                          "(merge_and_unload) and pass the merged model")
    if cfg.get("trainable_token_indices"):
        raise DowserError(f"{where}: trainable tokens (trainable_token_indices) are not supported; merge the adapter "
                          "with peft (merge_and_unload) and pass the merged model")
    if cfg.get("target_parameters"):
        raise DowserError(f"{where}: expert LoRA on parameters (target_parameters) is not supported; merge the adapter "
                          "with peft (merge_and_unload) and pass the merged model")


def read_adapter_config(ckpt: Checkpoint) -> dict:
    """`adapter_config.json`, refused unless it describes a LoRA this module can merge onto BASE."""
    where = f"{ckpt.where}/{ADAPTER_CONFIG}"
    cfg = adapter_config_json(ckpt)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise DowserError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA and SUPERTUNING)")
    _refuse_features(cfg, where)
    if cfg.get("use_dora"):
        raise DowserError(f"{where}: DoRA adapters are not supported; merge them with peft first")
    try:
        _ = int(cfg["r"]), float(cfg.get("lora_alpha", 8))  # each module's, with the patterns: LoraAdapter._pair
    except (KeyError, TypeError, ValueError):
        raise DowserError(f"{where}: needs an integer 'r' and a numeric 'lora_alpha'") from None
    init = cfg.get("init_lora_weights", True)
    if init_moves_base(init):
        raise DowserError(
            f"{where}: init_lora_weights {init!r} rewrote the base layer before training, so this adapter "
            "does not apply to BASE; save it with peft's path_initial_model_for_weight_conversion, or merge it "
            "with peft (merge_and_unload) and pass the merged model"
        )
    return cfg


@dataclass(frozen=True)
class LoraPair:
    a: str  # adapter tensor names
    b: str
    scale: float
    transpose: bool | None  # None: settled by the shapes in `check_shape`


class LoraAdapter:
    """The adapter's effect on each base tensor, by canonical name."""

    kind = "lora-adapter"

    def __init__(self, ckpt: Checkpoint, rules: KeyRules, in_out=None):
        self.ckpt, self.rules, self._hint = ckpt, rules, in_out
        cfg = self.config = read_adapter_config(ckpt)
        self.base_model = cfg.get("base_model_name_or_path")
        self.replacements: dict[str, str] = {}  # canonical -> adapter tensor replacing it whole
        self.stored_base: dict[str, str] = {}  # canonical -> the base layer saved with the adapter
        parts, modules = self._sort_keys(rules)
        self.pairs: dict[str, LoraPair] = {canon: self._pair(cfg, got, modules[canon], canon)
                                           for canon, got in parts.items()}
        both = set(self.pairs) & set(self.replacements)  # (a stored base layer is what the LoRA adds to)
        if both:
            raise DowserError(f"{ckpt.where}: {sorted(both)[0]!r} is both LoRA-adapted and replaced whole")
        for canon in [c for c in self.stored_base if c not in self.pairs]:  # a base layer without LoRA: its value
            self.replacements[canon] = self.stored_base.pop(canon)

    def _sort_keys(self, rules: KeyRules) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        """The adapter's keys: LoRA factors by canonical name and part (returned, with each one's module
        name); whole replacements and saved base layers (into `replacements` and `stored_base`)."""
        ckpt = self.ckpt
        parts: dict[str, dict[str, str]] = {}
        modules: dict[str, str] = {}
        for key in ckpt.tensor_names():
            if "lora_magnitude_vector" in key:
                raise DowserError(f"{ckpt.where}: {key!r} is a DoRA magnitude; DoRA adapters are not supported")
            if re.search(r"\.lora_[AB]\.([\w-]+\.)?bias$", key):
                raise DowserError(f"{ckpt.where}: {key!r} is a LoRA bias (lora_bias=true), which is not supported; "
                                  "merge the adapter with peft (merge_and_unload) and pass the merged model")
            if "trainable_tokens_delta" in key or ".token_adapter." in key:
                raise DowserError(f"{ckpt.where}: {key!r} holds trainable tokens (trainable_token_indices), which are "
                                  "not supported; merge the adapter with peft and pass the merged model")
            hit = rules.lora_target(key)
            if hit is None:
                plain, copy = peft_fold(key, saved=True)
                if copy == "original_module":
                    continue  # the frozen original beside a modules_to_save copy: not what the model uses
                held = self.stored_base if copy == "base_layer" else self.replacements
                canon = rules.canonical(plain)
                # PEFT may save one copy under two keys (`m.weight` and `m.modules_to_save.weight` when
                # embeddings are saved): fine when equal; never pick one of two values by file order.
                if canon in held and not same_bits(ckpt.read(held[canon]), ckpt.read(key)):
                    raise DowserError(f"{ckpt.where}: {held[canon]!r} and {key!r} both hold {canon!r}, "
                                      "with different values")
                held.setdefault(canon, key)
                continue
            canon, part, module = hit
            if part in parts.setdefault(canon, {}):
                raise DowserError(f"{ckpt.where}: {key!r} and {parts[canon][part]!r} adapt the same weight")
            parts[canon][part] = key
            modules[canon] = module
        return parts, modules

    def _pair(self, cfg: dict, got: dict[str, str], module: str, canon: str) -> LoraPair:
        """One module's lora_A/lora_B (or embedding_A/B) and its scale, checked against its rank."""
        ckpt = self.ckpt
        embedding = "embedding_A" in got or "embedding_B" in got
        a, b = (got.get("embedding_A"), got.get("embedding_B")) if embedding else (got.get("A"), got.get("B"))
        if a is None or b is None:
            raise DowserError(f"{ckpt.where}: {module!r} has only one of its lora_A/lora_B matrices")
        rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, int(cfg["r"])))
        mod_alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, float(cfg.get("lora_alpha", 8))))
        if ckpt.shape(a)[0] != rank or ckpt.shape(b)[-1] != rank:
            raise DowserError(
                f"{ckpt.where}: {module!r} has lora_A {list(ckpt.shape(a))} and lora_B "
                f"{list(ckpt.shape(b))}, but adapter_config.json gives it rank {rank}"
            )
        scale = mod_alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        return LoraPair(a, b, scale, transpose=True if embedding else self._layout(canon))

    def _layout(self, canon: str) -> bool | None:
        """Whether the weight `canon` is stored (in, out): from the model class, else the sidecar's hint."""
        known = stored_in_out(self.rules, canon)
        return known if known is not None else (self._hint(canon) if self._hint else None)

    def output_shape(self, canonical: str, base_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the adapter gives one base tensor (a saved base layer or copy may be resized)."""
        key = self.replacements.get(canonical) or self.stored_base.get(canonical)
        return tuple(self.ckpt.shape(key)) if key else tuple(base_shape)

    def check_shape(self, canonical: str, base_shape: tuple[int, ...]) -> None:
        """Refuse an adapter whose update does not fit the base weight, before anything is written."""
        own = self.output_shape(canonical, base_shape)
        if own[1:] != tuple(base_shape)[1:] or len(own) != len(base_shape):
            raise DowserError(
                f"{self.ckpt.where}: the adapter stores {canonical!r} with shape {list(own)}, the base weight has "
                f"{list(base_shape)}: only the number of rows (the vocabulary) may differ"
            )
        pair = self.pairs.get(canonical)
        if pair is None:
            return
        shape = (self.ckpt.shape(pair.b)[0], self.ckpt.shape(pair.a)[1])
        if pair.transpose is None:  # layout unknown: the shapes settle it; a square one, the file's flag
            fits, flipped = shape == own, shape[::-1] == own
            transpose = bool(self.config.get("fan_in_fan_out")) if fits == flipped else flipped
            pair = self.pairs[canonical] = replace(pair, transpose=transpose)
        if pair.transpose:
            shape = shape[::-1]
        if shape != own:
            raise DowserError(
                f"{self.ckpt.where}: the adapter's update of {canonical!r} has shape {list(shape)}, "
                f"the base weight {list(own)}: is this adapter for this base model?"
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
        if canonical in self.stored_base:
            weight = self.ckpt.read(self.stored_base[canonical])
        ab = self.ckpt.read_many([pair.a, pair.b])
        delta = ab[pair.b].float() @ ab[pair.a].float()
        if pair.transpose:
            delta = delta.T
        return weight + (delta * pair.scale).to(weight.dtype)
