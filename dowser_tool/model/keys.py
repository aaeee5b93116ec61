"""Tensor names: checkpoint keys <-> in-memory parameter names, by transformers' own loading rules.

Owns: PEFT's wrapping (`peft_fold`), transformers' key renamings and weight converters
(`KeyMap` for the probe, `KeyRules`/`NameMap`/`match_names` for merge and protect), fused-expert
placement, and which tensors are the input embedding and the output head (`RoleTensors`).
Nothing outside `dowser_tool.model` parses tensor names. Imports: `model.build`, errors.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DowserError
from .build import build_model, text_component

# PEFT's renaming (peft/tuners/tuners_utils.py, peft/utils/other.py ModulesToSaveWrapper,
# peft/utils/save_and_load.py).
_PEFT_PREFIX = "base_model.model."
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.([^.]+)\.")
# LoRA adapter keys: `<module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r) for Linear modules,
# `<module>.lora_embedding_A` / `_B` for embeddings; an adapter name may follow the part
# (`lora_A.default.weight`) in in-memory state dicts. Saved files drop it.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[\w-]+)?(\.weight)?$")


def peft_fold(name: str, saved: bool = False) -> tuple[str, str | None]:
    """Undo PEFT's renaming of one parameter or adapter key.

    PEFT renames in four ways:
    - `base_model.model.` in front of every name of a `PeftModel` (and of saved keys);
    - `<module>.base_layer.<param>`: the wrapped original layer of a LoRA module;
    - `<module>.modules_to_save.<adapter>.<param>`: the trainable copy of a module listed in
      `modules_to_save`; saved adapter files (`saved=True`) drop the adapter name, and usually the
      whole `modules_to_save.<adapter>.`;
    - `<module>.original_module.<param>`: the frozen original kept beside that copy.
    Returns (the name as the unwrapped model spells it, which copy it is: "base_layer",
    "modules_to_save:<adapter>" ("modules_to_save" when saved), "original_module", or None for a
    plain name). A family's own layouts are folded afterwards (`KeyRules.canonical`).
    """
    copy = None
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    m = None if saved else _MODULES_TO_SAVE.search(name)
    if m:
        copy = f"modules_to_save:{m.group(1)}"
        name = name[: m.start()] + "." + name[m.end():]
    elif saved and ".modules_to_save." in name:
        copy, name = "modules_to_save", name.replace(".modules_to_save.", ".", 1)
    elif ".original_module." in name:
        copy, name = "original_module", name.replace(".original_module.", ".", 1)
    elif ".base_layer." in name:
        copy, name = "base_layer", name.replace(".base_layer.", ".", 1)
    return name, copy


def fold_key(key: str) -> str:
    """A tensor name with PEFT's wrapping removed: the whole of name folding for a family without
    a transformers class."""
    return peft_fold(key)[0]


def natural_key(name: str):
    """Sort key that orders `layers.2` before `layers.10` (transformers' `dot_natural_key`)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")]


# ---- NVILA: a Qwen2 LLM under `llm.` -------------------------------------------------------------
# VILA's folder layout (root config with llm_cfg / vision_tower_cfg / mm_projector_cfg, the LLM saved
# by save_pretrained in llm/) and the flat `-hf` layout (keys `llm.model.*`, config `text_config`)

class KeyMap:
    """Checkpoint keys <-> in-memory parameter names, by transformers' own loading rules.

    Each key is renamed as `from_pretrained` renames it; a key matched by a weight
    converter (per-expert tensors fused into one 3-D parameter) joins that parameter's
    sources, in the order transformers collects them. Raises DowserError for a key that
    maps to no parameter or buffer, or two keys that map to one parameter without a converter.
    """

    def __init__(self, keys, model: nn.Module, where: str, prefix: str = ""):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        ignored = _ignored_keys(model)
        self.where = where
        self.param_of: dict[str, str] = {}
        self.sources: dict[str, list[str]] = {}
        self.converter: dict[str, object] = {}  # param -> WeightConverter template
        self.pattern: dict[str, str] = {}  # key -> converter source pattern
        for key in sorted(keys, key=natural_key):
            if prefix and not key.startswith(prefix):
                continue
            folded = fold_key(key[len(prefix):])
            target, pattern = rename_source_key(folded, renamings, converters, model.base_model_prefix, meta)
            if target not in meta and folded in meta:
                target, pattern = folded, None
            if target not in meta:
                if ignored is not None and ignored.search(folded):
                    continue
                raise DowserError(f"{where}: tensor {key!r} maps to no parameter of {type(model).__name__}")
            if pattern is None and target in self.sources:
                raise DowserError(f"{where}: tensors {self.sources[target][0]!r} and {key!r} both map to {target!r}")
            self.param_of[key] = target
            self.sources.setdefault(target, []).append(key)
            if pattern is not None:
                self.pattern[key] = pattern
                self.converter[target] = by_pattern[pattern]

    def keys(self) -> list[str]:
        return list(self.param_of)

    def load(self, params, read, model: nn.Module) -> dict[str, torch.Tensor]:
        """In-memory tensors for `params`, from checkpoint tensors `read(keys) -> {key: tensor}`,
        with the converters transformers applies (e.g. stacking per-expert tensors)."""
        keys = [k for p in params for k in self.sources[p]]
        raw = read(keys)
        out = {}
        for p in params:
            conv = self.converter.get(p)
            if conv is None:
                out[p] = raw[self.sources[p][0]]
                continue
            conv = copy.deepcopy(conv)
            for k in self.sources[p]:
                conv.add_tensor(p, k, self.pattern[k], raw[k])
            for name, t in conv.convert(p, model=model, config=model.config).items():
                out[name] = t[0] if isinstance(t, list) else t
        return {p: out[p] for p in params}


def _ignored_keys(model):
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    patterns |= {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}  # buffers old checkpoints stored
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def expert_slices(converter, pattern_of: dict[str, str], shapes: dict) -> dict[str, tuple[int, tuple[int, int]]]:
    """{key: (expert index, row range)} of per-expert checkpoint tensors inside the 3-D parameter a
    weight converter fuses them into, for the converters transformers 5 uses for Mixtral/Qwen-MoE
    experts: stack experts (`MergeModulelist(dim=0)`), optionally then concatenate projections along
    rows (`Concatenate(dim=1)`: gate rows first, then up). Keys are taken in the order transformers
    collects them (natural sort within each source pattern). Empty for any other conversion.
    """
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    stacked = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    if not stacked or not (len(ops) == 1 or (len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1)):
        return {}
    by_pattern: dict[str, list[str]] = {}
    for k in sorted(pattern_of, key=natural_key):
        by_pattern.setdefault(pattern_of[k], []).append(k)
    out, offset = {}, 0
    for pattern in converter.source_patterns:
        group = by_pattern.get(pattern, [])
        for e, k in zip(_expert_numbers(pattern, group), group):
            out[k] = (e, (offset, offset + shapes[k][0]))
        if group:
            offset += shapes[group[0]][0]
    return out


def _expert_numbers(pattern: str, keys: list[str]) -> list[int]:
    """Each key's expert index: the number the pattern's `*` stands for in it (`.experts.*.w1.weight`),
    so that a set missing some experts (a sidecar of part of a model) still lands on the right slices;
    the position in `keys` where the names carry no distinct numbers."""
    found = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
    numbers = [int(m.group(m.lastindex)) if (m := found.search(k)) and m.lastindex else None for k in keys]
    return numbers if None not in numbers and len(set(numbers)) == len(numbers) else list(range(len(keys)))


# ---- names across checkpoints and models (merge, protect, masks) -----------------------------------
_BUILT: dict[str, nn.Module] = {}


def _shared_build(config: dict, where: str) -> nn.Module:
    """build_model for name rules, once per distinct config (BASE and FT usually share one)."""
    import json

    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _BUILT:
        _BUILT.clear()  # keep one skeleton: they are cheap to rebuild, not to hold by the dozen
        _BUILT[key] = build_model(config, torch.float32, where)
    return _BUILT[key]


@dataclass(frozen=True)
class RoleTensors:
    """Which tensor of one checkpoint (or model) plays each role, by its own name (None: absent).

    `head` is the tensor the output head computes with: the stored head, or the embedding when
    the head is tied and not stored. `tied` is what the model's config says.
    """

    embedding: str | None
    head: str | None
    tied: bool

    def of(self, role: str) -> str | None:
        return self.head if role == "output_head" else self.embedding


class KeyRules:
    """How one model family names its tensors: the key renamings transformers applies when it loads
    that class (legacy layouts), PEFT's wrapping, and which parameters are the input embedding and
    the output head (and whether they are tied).

    Build with `KeyRules.of_config(config_dict, where)` (from a checkpoint) or `KeyRules.of_model(model)`
    (a model in memory, PEFT-wrapped or not). For a family transformers does not know (`known` False)
    only PEFT's wrapping is folded: names must otherwise match exactly.
    """

    def __init__(self, model: nn.Module | None, prefix: str = ""):
        self.model, self.prefix = model, prefix
        self.embed = self.head = self.text_config_key = None
        self.tied: dict[str, str] = {}
        self._renamings, self._converters, self._meta, self._base_prefix = [], [], {}, None
        if model is None:
            return
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        self._meta = dict.fromkeys(fold_key(k) for k in model.state_dict(keep_vars=True))  # PEFT-wrapped too
        self._base_prefix = model.base_model_prefix
        params = {id(p): fold_key(n) for n, p in model.named_parameters(remove_duplicate=False)}
        for attr, getter in (("embed", "get_input_embeddings"), ("head", "get_output_embeddings")):
            module = getattr(model, getter)() if hasattr(model, getter) else None
            weight = getattr(module, "weight", None)
            setattr(self, attr, params.get(id(weight)) if weight is not None else None)
        self.tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        text = model.config.get_text_config()
        self.text_config_key = next((k for k, v in vars(model.config).items() if v is text and v is not model.config),
                                    None)  # the sub-config holding the decoder (VLMs), None when it is the config

    @classmethod
    def of_config(cls, config: dict | None, where: str) -> "KeyRules":
        """The rules of the class a checkpoint's config.json describes; folding only if transformers
        does not know its model_type (DowserError for a config it knows but cannot build)."""
        if not config:
            return cls(None)
        prefix, key = "", None
        component = text_component(config)
        if component is not None:
            key = next(k for k, v in config.items() if v is component[0])
            config, prefix = component
        try:
            rules = cls(_shared_build(config, where), prefix)
        except DowserError as e:
            if "no transformers class" in str(e):
                return cls(None)
            raise
        if key is not None:
            rules.text_config_key = key  # NVILA: the LLM's config inside the root config
        return rules

    @classmethod
    def of_model(cls, model: nn.Module) -> "KeyRules":
        """The rules of a model in memory (a PeftModel's base model, or a model of unknown family)."""
        from transformers import PreTrainedModel

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return cls(base if isinstance(base, PreTrainedModel) else None)

    @property
    def known(self) -> bool:
        return self.model is not None

    def canonical(self, key: str) -> str:
        """The name a checkpoint key (or a model parameter name) has in memory, PEFT's wrapping undone.

        A per-expert tensor that loading fuses into a 3-D parameter keeps its own (renamed) name."""
        key = fold_key(key)
        if self.prefix:
            if not key.startswith(self.prefix):
                return key  # outside the modelled component (NVILA's vision tower, projector)
            key = key[len(self.prefix):]
        if self.model is None:
            return key
        from transformers.core_model_loading import rename_source_key

        renamed, _ = rename_source_key(key, self._renamings, [], self._base_prefix, self._meta)
        if renamed not in self._meta and key in self._meta:
            renamed = key
        return renamed

    def loads_into(self, key: str) -> str:
        """The in-memory parameter a checkpoint key loads into: `canonical`, and for a key a weight
        converter turns into a parameter (a fused expert stack stored under its own name, as
        GraniteMoeHybrid's `block_sparse_moe.input_linear.weight`), that parameter."""
        canon = self.canonical(key)
        if self.model is None or canon in self._meta:
            return canon
        from transformers.core_model_loading import rename_source_key

        folded = fold_key(key)
        folded = folded[len(self.prefix):] if self.prefix and folded.startswith(self.prefix) else folded
        target, _ = rename_source_key(folded, self._renamings, self._converters, self._base_prefix, self._meta)
        return target if target in self._meta else canon

    def expert_placement(self, shapes: dict) -> dict[str, tuple[str, int, tuple[int, int]]]:
        """For per-expert checkpoint tensors (`shapes`: {key: shape}) that loading fuses into 3-D
        parameters: {key: (parameter name, expert index, row range)}. Other keys are left out."""
        from transformers.core_model_loading import rename_source_key

        if self.model is None:
            return {}
        groups: dict[str, dict[str, str]] = {}
        converter_of = {}
        for key in shapes:
            folded = fold_key(key)
            if self.prefix:
                if not folded.startswith(self.prefix):
                    continue
                folded = folded[len(self.prefix):]
            target, pattern = rename_source_key(folded, self._renamings, self._converters, self._base_prefix, self._meta)
            if pattern is None or target not in self._meta:
                continue
            groups.setdefault(target, {})[key] = pattern
            converter_of[target] = next(c for c in self._converters if pattern in c.source_patterns)
        out = {}
        for target, pattern_of in groups.items():
            for key, (e, rows) in expert_slices(converter_of[target], pattern_of, shapes).items():
                out[key] = (target, e, rows)
        return out

    def roles(self, names) -> RoleTensors:
        """Which of `names` (checkpoint keys or parameter names) play the input embedding and the head."""
        by_canonical = {self.canonical(n): n for n in names}
        embedding = by_canonical.get(self.embed) if self.embed else None
        head = by_canonical.get(self.head) if self.head else None
        tied = bool(self.head and self.tied.get(self.head) == self.embed)
        return RoleTensors(embedding, head if head is not None or not tied else embedding, tied)

    def lora_target(self, key: str) -> tuple[str, str, str] | None:
        """For a PEFT LoRA key: (canonical name of the weight it adapts, part, PEFT module name), else None.

        Part is "A" or "B" ("embedding_A"/"embedding_B" for embeddings). The PEFT module name is
        the in-memory module path without the wrapper prefix: what `rank_pattern` keys match.
        """
        m = _LORA_KEY.match(key)
        if m is None:
            return None
        module = m.group("module")
        if module.startswith(_PEFT_PREFIX):
            module = module[len(_PEFT_PREFIX):]
        part = m.group("part")[len("lora_"):]
        return self.canonical(f"{module}.weight"), part, module


class NameMap:
    """Tensor names of one checkpoint <-> canonical names (KeyRules.canonical).

    Raises DowserError when two names fold to one canonical name. When the head is tied and not
    stored, the head's canonical name reads the embedding's tensor (`tied_alias`).
    """

    def __init__(self, names, rules: KeyRules, where: str = "checkpoint"):
        self.rules = rules
        self._to_key: dict[str, str] = {}
        for name in names:
            canon = rules.canonical(name)
            other = self._to_key.get(canon)
            if other is not None:
                raise DowserError(f"{where}: tensors {other!r} and {name!r} both map to {canon!r}")
            self._to_key[canon] = name
        self._to_canon = {v: k for k, v in self._to_key.items()}
        self.tied_alias: dict[str, str] = {}
        source = rules.tied.get(rules.head) if rules.head else None
        if source and rules.head not in self._to_key and source in self._to_key:
            self.tied_alias[rules.head] = source

    def canonical_names(self) -> list[str]:
        """Canonical names stored in the checkpoint (tied aliases excluded)."""
        return list(self._to_key)

    def __contains__(self, canonical: str) -> bool:
        return canonical in self._to_key or canonical in self.tied_alias

    def to_checkpoint(self, canonical: str) -> str:
        canonical = self.tied_alias.get(canonical, canonical)
        try:
            return self._to_key[canonical]
        except KeyError:
            raise DowserError(f"tensor {canonical!r} is not in the checkpoint") from None

    def to_canonical(self, name: str) -> str:
        return self._to_canon[name]


def match_names(wanted, available, rules: KeyRules) -> tuple[dict[str, str], list[str]]:
    """Pair names of one layout (a sidecar's checkpoint keys) with names of another (a model's
    in-memory parameter names, PEFT-wrapped or not) through their canonical names. (A sidecar probed
    on a composite reaches its language model loaded alone through `composite_prefix`: protect's
    `_composite`.)

    Returns (wanted name -> available name, wanted names that match nothing). Raises DowserError
    when two available names fold to one canonical name.
    """
    by_canonical: dict[str, str] = {}
    for name in available:
        canon = rules.canonical(name)
        other = by_canonical.setdefault(canon, name)
        if other != name:
            raise DowserError(f"names {other!r} and {name!r} both map to {canon!r}")
    matched, missing = {}, []
    for name in wanted:
        hit = by_canonical.get(rules.canonical(name))
        if hit is None:
            missing.append(name)
        else:
            matched[name] = hit
    return matched, missing


def mask_aliases(sidecar, name_map: NameMap, shape_of) -> dict[str, str]:
    """For `dowser merge` of a checkpoint that is the language model of the composite a sidecar was
    probed on (NVILA's `llm/`, a VLM's LLM fine-tuned alone): {sidecar name: canonical name in the
    checkpoint behind `name_map`} for the sidecar names it does not hold as they are, mapped by
    `composite_alias` (shapes must agree; fingerprints are checked as the merge reads BASE).
    `shape_of(checkpoint name)` gives a stored tensor's shape."""
    rules = name_map.rules
    unmatched = {n: tuple(sidecar.shapes[n]) for n in sidecar.names if rules.canonical(n) not in name_map}
    if not unmatched:
        return {}
    shapes = {c: tuple(shape_of(name_map.to_checkpoint(c))) for c in name_map.canonical_names()}
    return composite_alias(unmatched, shapes, rules)


def composite_prefix(names, model_names: set, rules: KeyRules) -> tuple[str, str] | None:
    """(P, Q): the composite's prefix of `names` and the model's for the same tensors, as
    `composite_alias` finds them: from the longest dotted suffix of each name that names exactly
    one of `model_names` (canonical); the most common pair. Per-expert names, which no parameter ends
    with, do not vote; they follow the pair the other tensors agree on. None when nothing votes."""
    from collections import Counter

    suffixes: dict[str, set[str]] = {}
    for canon in model_names:
        parts = canon.split(".")
        for k in range(len(parts)):
            suffixes.setdefault(".".join(parts[k:]), set()).add(canon)
    votes: Counter = Counter()
    for name in names:
        parts = rules.canonical(name).split(".")
        for k in range(1, len(parts)):
            suffix = ".".join(parts[k:])
            hits = suffixes.get(suffix)
            if hits:
                if len(hits) == 1:
                    (hit,) = hits
                    votes[(".".join(parts[:k]) + ".", hit[: len(hit) - len(suffix)])] += 1
                break
    return votes.most_common(1)[0][0] if votes else None


FINGERPRINTS_CHECKED = 16  # protect's composite mapping checks this many fingerprints: enough to tell another model's weights


def composite_alias(wanted: dict[str, tuple], tensors: dict, rules: KeyRules) -> dict[str, str]:
    """{wanted name: canonical name in `tensors`} for the names of a composite checkpoint (a VLM, NVILA)
    whose language model `tensors` holds on its own, else {}.

    `wanted`: {name: shape} of names that match nothing directly; `tensors`: {canonical name: shape}
    of the model alone. The composite's prefix P and the model's Q (`llm.` -> ``,
    `model.language_model.` -> `model.`, `language_model.model.` -> `model.`) come from the longest
    dotted suffixes that name exactly one tensor of the model (`composite_prefix`); the most common
    (P, Q) is taken, and applies only if every wanted name under P maps to a tensor of the same
    shape. Fingerprints are checked as the merge reads BASE (`repair.plan.MergePlan.check_fingerprint`)."""
    pair = composite_prefix(wanted, set(tensors), rules)
    if pair is None:
        return {}
    p, q = pair
    alias = {}
    for name in wanted:
        canon = rules.canonical(name)
        if not canon.startswith(p):
            continue
        target = rules.canonical(q + canon[len(p):])
        if target not in tensors or _shape(tensors[target]) != tuple(wanted[name]):
            return {}
        alias[name] = target
    return alias


def _shape(t) -> tuple:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(t)
