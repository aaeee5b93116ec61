"""The anatomy of one checkpoint: what is where, discovered from its transformers class.

This is the only module that knows how models are built and how tensors are
named. Nothing here is a per-family table: the model class named by the
checkpoint's config is built with every parameter on the `meta` device, and its
parts are found through transformers' own interfaces:

- decoder layers: the `nn.ModuleList` inside `get_decoder()` whose blocks are
  the model's `_no_split_modules` (the unit accelerate places on one device);
- input embedding and output head: `get_input_embeddings()`,
  `get_output_embeddings()`; tied weights: `all_tied_weights_keys`, the model's
  own tied-weights declaration expanded by transformers;
- vision tower: `get_encoder(modality="image")`; its layers are the blocks of its
  `ModuleList`s; every other linear weight outside the decoder layers, the head
  and the vision layers is the projector (what maps image features into the
  decoder: LLaVA's `multi_modal_projector`, Qwen-VL's mergers, ...);
- checkpoint keys: the key renamings and weight converters transformers applies
  when it loads that class (`transformers.conversion_mapping.get_model_conversion_mapping`,
  `transformers.core_model_loading.rename_source_key`), which fold legacy layouts
  (LLaVA's `language_model.model.*`, Mixtral's `block_sparse_moe`, ...) and fuse
  per-expert tensors into 3-D parameters, plus the PEFT wrapper prefix.

Checkpoints of families transformers does not know still merge and protect:
`fold_key` folds only the wrapper prefixes there, and names must match exactly.
NVILA, which has no transformers class, is read as its Qwen2 LLM under the key
prefix `llm.` (`text_component`).
"""

from __future__ import annotations

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ..errors import DowserError
from .build import build_model, text_component
from .keys import KeyMap, expert_slices, natural_key


@dataclass(frozen=True)
class Weight:
    """One checkpoint tensor the probe can score.

    key: its name in the checkpoint (the sidecar's name for it); param: the in-memory
    parameter it loads into; module: the module whose forward multiplies by it.
    A linear weight is (out, in); transformers' `Conv1D` stores (in, out) (`transposed`).
    Per-expert tensors of a fused 3-D expert parameter give `expert` (index into the
    parameter's first dimension) and `rows` (its rows inside that expert's slice).
    part: decoder | lm_head | vision | projector; kind: attention | mlp | expert | router |
    lm_head | vision | projector (for tables).
    """

    key: str
    param: str
    module: str
    part: str
    kind: str
    layer: int | None = None
    transposed: bool = False
    expert: int | None = None
    rows: tuple[int, int] | None = None




class Anatomy:
    """The parts of one checkpoint's model, found once; streaming, probe, merge and protect ask it.

    Build with `Anatomy.of(config, keys, where)`. Attributes (in-memory parameter names
    unless said otherwise): `model` (the skeleton, parameters on meta), `layers_path`,
    `layers` (the decoder's ModuleList), `layer_params[i]`, `stem_params` (everything
    outside the decoder layers), `embed` / `head` (weights of the input embedding and
    output head), `tied` (tied target -> source), `keys` (KeyMap), `prefix` (checkpoint key
    prefix of the model, `llm.` for NVILA), `shapes` (checkpoint key -> shape).
    """

    def __init__(self, model: nn.Module, shapes: dict, where: str, prefix: str = ""):
        self.model, self.where, self.prefix = model, where, prefix
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.text_config = model.config.get_text_config()
        self.keys = KeyMap(self.shapes, model, where, prefix)
        self.layers_path, self.layers = self._find_layers()
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        self.layer_params = [[n for n in names if n.startswith(f"{self.layers_path}.{i}.")] for i in range(len(self.layers))]
        in_layers = {n for group in self.layer_params for n in group}
        self.stem_params = [n for n in names if n not in in_layers]
        self.tied: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})
        self.embed = self._weight_of(model.get_input_embeddings())
        self.head = self._weight_of(model.get_output_embeddings())
        self._check_complete()

    @classmethod
    def of(cls, config: dict, shapes: dict, where: str, dtype: torch.dtype = torch.float32) -> "Anatomy":
        """Discover the anatomy of a checkpoint from its config.json (dict) and {tensor name: shape}."""
        prefix = ""
        component = text_component(config)
        if component is not None:
            config, prefix = component
        return cls(build_model(config, dtype, where), shapes, where, prefix)

    # ---- discovery ------------------------------------------------------------------------------
    def _find_layers(self) -> tuple[str, nn.ModuleList]:
        decoder = self.model.get_decoder()
        no_split = set(getattr(self.model, "_no_split_modules", None) or ())
        n_layers = getattr(self.text_config, "num_hidden_layers", None)
        prefix = _path_of(self.model, decoder)
        candidates = [
            (name, mod) for name, mod in decoder.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) and type(mod[0]).__name__ in no_split
        ]
        candidates.sort(key=lambda c: (len(c[1]) != n_layers, -len(c[1])))
        if not candidates:
            raise DowserError(f"{self.where}: cannot find the decoder layers of {type(self.model).__name__} "
                              "(no ModuleList of its _no_split_modules blocks inside get_decoder())")
        name, layers = candidates[0]
        return ".".join(p for p in (prefix, name) if p), layers

    def _weight_of(self, module) -> str | None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            return None
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p is weight:
                return name
        return None

    def _check_complete(self) -> None:
        loaded = set(self.keys.sources)
        missing = [n for n in self.stem_params + [n for g in self.layer_params for n in g]
                   if n not in loaded and self.tied.get(n) not in loaded]
        if missing:
            raise DowserError(f"{self.where}: no tensor for {len(missing)} of the {type(self.model).__name__} parameters "
                              f"its config describes, e.g. {missing[0]!r}")

    @cached_property
    def vision_encoder(self) -> str | None:
        """Module path of the vision tower, or None for a text-only model."""
        try:
            enc = self.model.get_encoder(modality="image")
        except (TypeError, ValueError, AttributeError):
            return None
        if enc is self.model or enc is self.model.get_decoder() or enc is getattr(self.model, "base_model", None):
            return None
        return _path_of(self.model, enc)

    @cached_property
    def vision_layers(self) -> list[str]:
        """Module paths of the vision tower's blocks (elements of its ModuleLists of
        `_no_split_modules` blocks, else of its longest ModuleList)."""
        if self.vision_encoder is None:
            return []
        enc = self.model.get_submodule(self.vision_encoder)
        no_split = set(getattr(self.model, "_no_split_modules", None) or ())
        lists = [(n, m) for n, m in enc.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        chosen = [(n, m) for n, m in lists if type(m[0]).__name__ in no_split] or sorted(lists, key=lambda x: -len(x[1]))[:1]
        return [f"{self.vision_encoder}.{n}.{i}" for n, m in chosen for i in range(len(m))]

    # ---- what the probe scores ---------------------------------------------------------------
    def decoder_weights(self, i: int) -> list[Weight]:
        """Every linear weight of decoder layer i (nn.Linear, Conv1D, per-expert slices of fused
        3-D expert parameters), in checkpoint-key order; routers are kind 'router'."""
        out = []
        layer_path = f"{self.layers_path}.{i}"
        layer = self.layers[i]
        n_experts = {p.shape[0] for n, p in layer.named_parameters() if p.dim() == 3}
        for mod_name, mod in layer.named_modules():
            path = f"{layer_path}.{mod_name}" if mod_name else layer_path
            kind = _kind(self.model, layer_path, path)
            if _is_linear(mod):
                param = f"{path}.weight"
                if param not in self.keys.sources:
                    continue
                out_f = mod.weight.shape[1] if _is_conv1d(mod) else mod.weight.shape[0]
                if n_experts and out_f in n_experts | {1}:
                    kind = "router"
                for key in self.keys.sources[param]:
                    out.append(Weight(key, param, path, "decoder", kind, i, transposed=_is_conv1d(mod)))
            for pname, p in mod.named_parameters(recurse=False):
                if p.dim() == 3:
                    out += self._expert_weights(f"{path}.{pname}", path, i)
        return sorted(out, key=lambda w: natural_key(w.key))

    def _expert_weights(self, param: str, module: str, layer: int) -> list[Weight]:
        """Per-expert checkpoint tensors of a fused 3-D parameter and where each sits in it."""
        conv = self.keys.converter.get(param)
        if conv is None:
            return []  # stored fused on disk: see unscorable()
        keys = self.keys.sources[param]
        slices = expert_slices(conv, {k: self.keys.pattern[k] for k in keys}, self.shapes)
        return [Weight(k, param, module, "decoder", "expert", layer, expert=e, rows=rows)
                for k, (e, rows) in slices.items()]

    def unscorable(self, i: int) -> list[str]:
        """Checkpoint keys of layer i's 3-D expert tensors stored fused on disk (not per expert):
        the probe cannot score them."""
        layer_path = f"{self.layers_path}.{i}."
        return [k for p, ks in self.keys.sources.items() if p.startswith(layer_path) and p not in self.keys.converter
                for k in ks if len(self.shapes[k]) == 3]

    def head_weight(self) -> Weight | None:
        """The output head's weight as stored: its own key, or the embedding's when tied and absent."""
        if self.head is None:
            return None
        param = self.head if self.head in self.keys.sources else self.tied.get(self.head)
        if param not in self.keys.sources:
            return None
        return Weight(self.keys.sources[param][0], self.head, self.head.rpartition(".")[0], "lm_head", "lm_head")

    def stem_weights(self, part: str) -> list[Weight]:
        """Linear weights of the vision layers ('vision') or of the projector ('projector')."""
        vision = tuple(f"{v}." for v in self.vision_layers)
        head_module = self.head.rpartition(".")[0] if self.head else None
        out = []
        for path, mod in self.model.named_modules():
            if not _is_linear(mod) or path == head_module or path.startswith(f"{self.layers_path}."):
                continue
            in_vision = path.startswith(vision) if vision else False
            if (part == "vision") != in_vision:
                continue
            param = f"{path}.weight"
            for key in self.keys.sources.get(param, []):
                out.append(Weight(key, param, path, part, part, transposed=_is_conv1d(mod)))
        return sorted(out, key=lambda w: natural_key(w.key))

    # ---- roles ------------------------------------------------------------------------------------
    def role_keys(self) -> dict[str, str]:
        """{'input_embedding': key, 'output_head': key} of the tensors that play those roles
        (one key for both when the head is tied to the embedding)."""
        roles = {}
        if self.embed and self.embed in self.keys.sources:
            roles["input_embedding"] = self.keys.sources[self.embed][0]
        head = self.head_weight()
        if head is not None:
            roles["output_head"] = head.key
        return roles


def _path_of(root: nn.Module, module: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    raise DowserError(f"{type(module).__name__} is not part of {type(root).__name__}")


def _is_conv1d(mod) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, Conv1D)


def _is_linear(mod) -> bool:
    return (isinstance(mod, nn.Linear) or _is_conv1d(mod)) and isinstance(getattr(mod, "weight", None), nn.Parameter)


def _kind(model, layer_path: str, path: str) -> str:
    """attention | mlp, from the classes of the modules between the layer and `path` (per-expert
    slices of fused parameters are kind 'expert', routers 'router': decided by the caller)."""
    parts = path[len(layer_path):].strip(".").split(".") if path != layer_path else []
    mod = model.get_submodule(layer_path)
    names = []
    for p in parts:
        mod = getattr(mod, p)
        names.append(type(mod).__name__.lower())
