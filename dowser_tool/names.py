"""The one place that knows architectures and tensor names.

Every other module speaks *canonical* names: the parameter names of the
transformers model class for the checkpoint's `model_type`, as
`model.named_parameters()` prints them (transformers 5 layout, e.g.
`model.language_model.layers.3.mlp.up_proj.weight` for LLaVA). Checkpoints on
disk may use other layouts (LLaVA's legacy `language_model.model.layers.N`, which
`save_pretrained` still writes; Qwen2-VL's `model.layers.N`; a PEFT
`base_model.model.` prefix); `canonical_name` folds them, `NameMap` goes back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import DowserError

# Linear weights scored by default in every decoder layer (METHOD.md: "Which weights").
DECODER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Architecture:
    """Where the parts of one model family live, in canonical names."""

    model_types: tuple[str, ...]
    auto_class: str  # the transformers Auto class that builds the full model
    layers: str  # ModuleList of decoder layers
    embed: str
    final_norm: str
    head: str
    text_config_key: str | None = None  # sub-config holding the decoder (VLMs)
    vision: str | None = None
    projector: str | None = None
    # (pattern, replacement) applied in order to turn a checkpoint key into a canonical name
    renames: tuple[tuple[str, str], ...] = field(default_factory=tuple)


_DECODER = dict(
    auto_class="AutoModelForCausalLM",
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(model_types=("llama", "mistral", "qwen2", "qwen3"), **_DECODER),
    Architecture(
        model_types=("llava",),
        auto_class="AutoModelForImageTextToText",
        layers="model.language_model.layers",
        embed="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
        head="lm_head",
        text_config_key="text_config",
        vision="model.vision_tower",
        projector="model.multi_modal_projector",
        renames=(
            (r"^language_model\.lm_head\.", "lm_head."),
            (r"^language_model\.model\.", "model.language_model."),
            (r"^language_model\.", "model.language_model."),
            (r"^vision_tower\.vision_model\.", "model.vision_tower."),
            (r"^vision_tower\.", "model.vision_tower."),
            (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        ),
    ),
    Architecture(
        model_types=("qwen2_vl", "qwen2_5_vl"),
        auto_class="AutoModelForImageTextToText",
        layers="model.language_model.layers",
        embed="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
        head="lm_head",
        text_config_key="text_config",
        vision="model.visual",
        projector="model.visual.merger",
        renames=(
            (r"^visual\.", "model.visual."),
            (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
        ),
    ),
)

# Wrappers that may sit in front of any layout (PEFT saves `base_model.model.` + the model's own names).
_WRAPPER_PREFIXES = ("base_model.model.",)


def architecture_for(config: dict, where: str = "config.json") -> Architecture:
    """The Architecture for a config dict, or a clear error naming the unsupported type."""
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise DowserError(f"{where}: unsupported architecture {model_type!r} (supported: {supported})")


def text_config(config: dict, arch: Architecture) -> dict:
    return config.get(arch.text_config_key, {}) if arch.text_config_key else config


def ties_embeddings(config: dict, arch: Architecture) -> bool:
    """Whether lm_head shares the input embedding (transformers' default is True if unset)."""
    sub = text_config(config, arch)
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return bool(sub.get("tie_word_embeddings", False))


def canonical_name(name: str, arch: Architecture) -> str:
    """Fold any known on-disk layout of a tensor name into the canonical (in-memory) name."""
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    name = name.replace(".base_layer.", ".")  # PEFT wraps adapted Linear modules
    for pattern, repl in arch.renames:
        new = re.sub(pattern, repl, name, count=1)
        if new != name:
            return new
    return name


_LAYER_RE_CACHE: dict[str, re.Pattern] = {}


def layer_index(canonical: str, arch: Architecture) -> int | None:
    """Decoder layer number of a canonical name, or None."""
    pat = _LAYER_RE_CACHE.setdefault(arch.layers, re.compile(re.escape(arch.layers) + r"\.(\d+)\."))
    m = pat.match(canonical)
    return int(m.group(1)) if m else None


def block_of(canonical: str, arch: Architecture) -> str:
    """The streaming block a canonical tensor belongs to: embed, layers.N, vision, projector, head or other."""
    i = layer_index(canonical, arch)
    if i is not None:
        return f"layers.{i}"
    if arch.projector and canonical.startswith(arch.projector + "."):
        return "projector"  # checked before vision: Qwen2-VL's merger sits inside the visual tower
    if arch.vision and canonical.startswith(arch.vision + "."):
        return "vision"
    if canonical.startswith(arch.embed + "."):
        return "embed"
    if canonical.startswith(arch.final_norm + ".") or canonical.startswith(arch.head + "."):
        return "head"
    return "other"


def module_kind(canonical: str) -> str:
    """A short label for tables and plots: q_proj, up_proj, lm_head, ..."""
    parts = canonical.split(".")
    return parts[-2] if len(parts) >= 2 else canonical


class NameMap:
    """Checkpoint tensor names <-> canonical names for one checkpoint.

    Fails on ambiguity (two checkpoint keys folding to one canonical name) and
    resolves tied weights: when lm_head is tied and absent from the file, its
    canonical name reads the embedding's tensor.
    """

    def __init__(self, checkpoint_names, arch: Architecture, tied: bool = False, where: str = "checkpoint"):
        self.arch = arch
        self.tied = tied
        self._to_ckpt: dict[str, str] = {}
        for name in checkpoint_names:
            canon = canonical_name(name, arch)
            other = self._to_ckpt.get(canon)
            if other is not None:
                raise DowserError(f"{where}: tensors {other!r} and {name!r} both map to {canon!r}")
            self._to_ckpt[canon] = name
        self._to_canon = {v: k for k, v in self._to_ckpt.items()}
        head_w, embed_w = f"{arch.head}.weight", f"{arch.embed}.weight"
        self.tied_alias: dict[str, str] = {}
        if tied and head_w not in self._to_ckpt and embed_w in self._to_ckpt:
            self.tied_alias[head_w] = embed_w

    def canonical_names(self) -> list[str]:
        """Canonical names stored in the checkpoint (tied aliases excluded)."""
        return list(self._to_ckpt)

    def __contains__(self, canonical: str) -> bool:
        return canonical in self._to_ckpt or canonical in self.tied_alias

    def to_checkpoint(self, canonical: str) -> str:
        canonical = self.tied_alias.get(canonical, canonical)
        try:
            return self._to_ckpt[canonical]
        except KeyError:
            raise DowserError(f"tensor {canonical!r} is not in the checkpoint") from None

    def to_canonical(self, checkpoint_name: str) -> str:
        return self._to_canon[checkpoint_name]

    def blocks(self) -> dict[str, list[str]]:
        """Canonical names grouped by block, decoder layers in order."""
        groups: dict[str, list[str]] = {}
        for canon in sorted(self._to_ckpt, key=_natural_key):
            groups.setdefault(block_of(canon, self.arch), []).append(canon)
        return groups

    def num_layers(self) -> int:
        idx = [layer_index(c, self.arch) for c in self._to_ckpt]
        idx = [i for i in idx if i is not None]
        return max(idx) + 1 if idx else 0


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def scored_names(
    name_map: NameMap, layers: list[int] | None = None, include: tuple[str, ...] = (), is_linear=None
) -> list[str]:
    """Canonical names of the weights a probe scores: decoder linears of the chosen layers,
    plus optional extras from include (lm_head, projector, vision). `is_linear(canonical)`
    tells which projector/vision weights belong to nn.Linear modules (the skeleton knows)."""
    arch = name_map.arch
    wanted = set(layers) if layers is not None else None
    out = []
    candidates = sorted(set(name_map.canonical_names()) | set(name_map.tied_alias), key=_natural_key)
    for canon in candidates:
        if not canon.endswith(".weight"):
            continue
        i = layer_index(canon, arch)
        if i is not None:
            rest = canon[len(f"{arch.layers}.{i}.") : -len(".weight")]
            if rest in DECODER_LINEARS and (wanted is None or i in wanted):
                out.append(canon)
            continue
        block = block_of(canon, arch)
        if "lm_head" in include and canon == f"{arch.head}.weight":
            out.append(canon)
        elif block in include and block in ("projector", "vision") and is_linear and is_linear(canon):
            out.append(canon)
    return out



# For models of a family not listed above: only wrapper prefixes (PEFT) are folded.
_WRAPPERS_ONLY = Architecture(model_types=(), auto_class="", layers="", embed="", final_norm="", head="")


def match_names(wanted, available, arch: Architecture | None) -> tuple[dict[str, str], list[str]]:
    """Pair names of one layout (a sidecar's checkpoint names) with names of another (a model's
    in-memory parameter names, PEFT-wrapped or not) through their canonical names.

    Returns (wanted name -> available name, wanted names that match nothing). `arch` None
    (a family this module does not know) folds only wrapper prefixes.
    """
    arch = arch or _WRAPPERS_ONLY
    by_canonical: dict[str, str] = {}
    for name in available:
        canon = canonical_name(name, arch)
        other = by_canonical.setdefault(canon, name)
        if other != name:
            raise DowserError(f"names {other!r} and {name!r} both map to {canon!r}")
    matched, missing = {}, []
    for name in wanted:
        hit = by_canonical.get(canonical_name(name, arch))
        if hit is None:
            missing.append(name)
        else:
            matched[name] = hit
    return matched, missing


# PEFT LoRA adapter keys: `<wrapper><module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r) for
# Linear modules, `<module>.lora_embedding_A` / `_B` for embeddings; an adapter name may follow the
# part (`lora_A.default.weight`) in in-memory state dicts. Saved files drop it.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[\w-]+)?(\.weight)?$")


def lora_target(key: str, arch: Architecture | None) -> tuple[str, str, str] | None:
    """For a PEFT LoRA key: (canonical name of the weight it adapts, part, PEFT module name), else None.

    Part is "A" or "B" ("embedding_A"/"embedding_B" for embeddings). The PEFT module name is
    the in-memory module path without the wrapper prefix: what `rank_pattern` keys match.
    """
    m = _LORA_KEY.match(key)
    if m is None:
        return None
    module = m.group("module")
    for prefix in _WRAPPER_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix) :]
    part = m.group("part")[len("lora_") :]
    return canonical_name(f"{module}.weight", arch or _WRAPPERS_ONLY), part, module
