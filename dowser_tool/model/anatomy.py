"""The anatomy of one checkpoint: what is where, discovered from its transformers class.

This is the only module that knows how models are built and how tensors are
named. Nothing here is a per-family table: the model class named by the
checkpoint's config is built with every parameter on the `meta` device, and its
parts are found through transformers' own interfaces:

- decoder layers: the `nn.ModuleList` inside `get_decoder()` (followed down to an
  encoder-decoder's decoder) whose blocks are the model's `_no_split_modules` (the
  unit accelerate places on one device); other such stacks (an encoder) are named
  as not scored;
- what is scored in a layer: every linear weight, by what its module is (`moe_parts`:
  an MoE block's router and experts); every other tensor of the layer that is not a
  norm or a bias is listed with its reason (`unscored`);
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

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ..errors import DowserError
from .build import build_model, text_component
from .experts import stack_layout
from .keys import KeyMap, expert_slices, natural_key


@dataclass(frozen=True)
class Weight:
    """One checkpoint tensor the probe can score.

    key: its name in the checkpoint (the sidecar's name for it); param: the in-memory
    parameter it loads into; module: the module whose forward multiplies by it.
    A linear weight is (out, in); transformers' `Conv1D` stores (in, out) (`transposed`).
    Per-expert tensors of a fused 3-D expert parameter give `expert` (index into the
    parameter's first dimension) and `rows` (its rows inside that expert's slice).
    part: decoder | lm_head | vision | projector; kind: attention | mixer (a Mamba, short-convolution
    or linear-attention token mixer) | mlp | expert | router | lm_head | vision | projector (for tables).
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
        decoder = self.decoder_module
        no_split = set(getattr(self.model, "_no_split_modules", None) or ())
        n_layers = getattr(self.text_config, "decoder_layers", None) or getattr(self.text_config, "num_hidden_layers", None)
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

    @cached_property
    def decoder_module(self) -> nn.Module:
        """The decoder stack (`decoder_of`)."""
        return decoder_of(self.model)

    @cached_property
    def other_stacks(self) -> list[str]:
        """Module paths of the layer stacks the probe does not score (`other_stacks`)."""
        return other_stacks(self.model, [self.layers_path] + ([self.vision_encoder] if self.vision_encoder else []))

    def stack_note(self) -> str | None:
        """One line saying which layer stack is scored and which are not; None with one stack."""
        if not self.other_stacks:
            return None
        return (f"layer stack {', '.join(self.other_stacks)}: not scored, the probe scores the decoder stack "
                f"{self.layers_path} (get_decoder())")

    def unscored_outside(self) -> dict[str, str]:
        """{checkpoint key: reason} for the linear weights of the layer stacks the probe does not score
        (`other_stacks`), the reason being `stack_note()`."""
        note = self.stack_note()
        if note is None:
            return {}
        out = {}
        for stack in self.other_stacks:
            for path, mod in self.model.get_submodule(stack).named_modules():
                if _is_linear(mod):
                    for key in self.keys.sources.get(f"{stack}.{path}.weight", []):
                        out[key] = note
        return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))

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
        """Module paths of the vision tower's blocks: elements of its ModuleLists of `_no_split_modules`
        blocks; else of every ModuleList whose elements hold linear layers (a tower in stages keeps one
        list per stage, Florence-2's DaViT; a list of patch-embedding convolutions is not blocks)."""
        if self.vision_encoder is None:
            return []
        enc = self.model.get_submodule(self.vision_encoder)
        no_split = set(getattr(self.model, "_no_split_modules", None) or ())
        lists = [(n, m) for n, m in enc.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        chosen = [(n, m) for n, m in lists if type(m[0]).__name__ in no_split] or [
            (n, m) for n, m in lists
            if not isinstance(m[0], nn.ModuleList) and any(_is_linear(x) for x in m[0].modules())]
        return [f"{self.vision_encoder}.{n}.{i}" for n, m in chosen for i in range(len(m))]

    # ---- what the probe scores ---------------------------------------------------------------
    def decoder_weights(self, i: int) -> list[Weight]:
        """Every linear weight of decoder layer i (nn.Linear, Conv1D, per-expert slices of fused
        3-D expert parameters), in checkpoint-key order, whatever the layer kind (attention, MLP,
        Mamba and short-convolution projections, linear attention, shared experts).

        What a weight is comes from the module that holds it, never from shapes: a linear inside a
        mixture-of-experts block's router (`moe_parts`) is kind 'router'; a 3-D parameter is an
        expert stack only inside the block's experts module (a convolution kernel is not)."""
        out = []
        layer_path = f"{self.layers_path}.{i}"
        routers, experts = self.moe_parts(i)
        for mod_name, mod in self.layers[i].named_modules():
            path = f"{layer_path}.{mod_name}" if mod_name else layer_path
            if _is_linear(mod):
                param = f"{path}.weight"
                if param not in self.keys.sources:
                    continue
                kind = "router" if _inside(mod_name, routers) else _kind(self.model, layer_path, path)
                for key in self.keys.sources[param]:
                    out.append(Weight(key, param, path, "decoder", kind, i, transposed=_is_conv1d(mod)))
            elif _inside(mod_name, experts) and not _inside(mod_name, routers):
                for pname, p in mod.named_parameters(recurse=False):
                    if p.dim() == 3:
                        out += self._expert_weights(f"{path}.{pname}", path, i)
        return sorted(out, key=lambda w: natural_key(w.key))

    def moe_parts(self, i: int) -> tuple[set[str], set[str]]:
        """(router modules, experts modules) of decoder layer i, as paths inside it (`moe_parts`)."""
        return moe_parts(self.layers[i])

    def _expert_weights(self, param: str, module: str, layer: int) -> list[Weight]:
        """Per-expert checkpoint tensors of a fused 3-D parameter and where each sits in it; or the one
        stored 3-D tensor it loads from (on disk, or through a transposing converter), scored per expert
        slice when the experts module declares its layout (model/experts.py; else see unscorable())."""
        conv = self.keys.converter.get(param)
        keys = self.keys.sources[param]
        slices = expert_slices(conv, {k: self.keys.pattern[k] for k in keys}, self.shapes) if conv is not None else {}
        if not slices and len(keys) == 1:
            layout = stack_layout(self.model.get_submodule(module), conv, self.shapes[keys[0]],
                                  self.model.get_parameter(param).shape, param.rpartition(".")[2])
            return [] if layout is None else [Weight(keys[0], param, module, "decoder", "expert", layer,
                                                     transposed=layout)]
        return [Weight(k, param, module, "decoder", "expert", layer, expert=e, rows=rows)
                for k, (e, rows) in slices.items()]

    def unscorable(self, i: int) -> list[str]:
        """Checkpoint keys of layer i's 3-D expert tensors stored fused on disk (not per expert):
        the probe cannot score them."""
        return [k for k, reason in self.unscored(i).items() if reason == FUSED_ON_DISK]

    def unscored(self, i: int) -> dict[str, str]:
        """{checkpoint key: why it is not scored} for every tensor of decoder layer i that the probe
        does not score.

        Reasons: norm weights and biases (never scored, in any layer; docs/PROBE.md); routers that are not linear layers (transformers' `...TopKRouter` modules compute
        with their own `weight`); expert stacks stored fused on disk; convolution kernels
        (Mamba's and short-convolution `conv1d`); state-space and other per-channel parameters
        (`A_log`, `D`, `dt_bias`, attention sinks, gates); linear routers are scored with
        `--include router` (the probe's selection says so)."""
        layer_path = f"{self.layers_path}.{i}"
        routers, experts = self.moe_parts(i)
        scored = {w.param for w in self.decoder_weights(i)}
        out: dict[str, str] = {}
        for mod_name, mod in self.layers[i].named_modules():
            path = _join(layer_path, mod_name)
            for pname, p in mod.named_parameters(recurse=False):
                param = f"{path}.{pname}"
                if param in scored or param not in self.keys.sources:
                    continue
                reason = _unscored_reason(mod, pname, p, _inside(mod_name, routers), _inside(mod_name, experts),
                                          param in self.keys.converter)
                for key in self.keys.sources[param]:
                    out[key] = reason
        return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))

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
            if any(path.startswith(f"{o}.") for o in self.other_stacks):
                continue  # another stack's layers (an encoder-decoder's encoder): not the projector
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
    """attention | mixer | mlp, from the modules between the layer and `path`: attention when one's
    class names attention; mixer when one holds a convolution (Mamba/Mamba2 mixers, short
    convolutions, gated DeltaNet); else mlp. Per-expert slices of fused parameters are kind
    'expert', routers 'router': decided by the caller."""
    parts = path[len(layer_path):].strip(".").split(".") if path != layer_path else []
    mod = model.get_submodule(layer_path)
    names, mixer = [], False
    for p in parts:
        mod = getattr(mod, p)
        names.append(type(mod).__name__.lower())
        mixer = mixer or any(isinstance(c, _CONVS) for c in mod.children())
    if any("attn" in n or "attention" in n for n in names):
        return "attention"
    # a token mixer with a convolution: Mamba/Mamba2 mixers, short convolutions, gated DeltaNet
    return "mixer" if mixer else "mlp"


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
FUSED_ON_DISK = "fused 3-D expert tensor on disk: its per-expert activations cannot be recorded"


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


def _inside(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(f"{r}.") for r in roots)


def _is_norm(mod) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(mod).__name__.lower()


def _unscored_reason(mod, pname: str, p, in_router: bool, in_experts: bool, converted: bool) -> str:
    """Why a parameter of a decoder layer is not scored (every one that is not has a reason)."""
    if pname == "bias" or pname.endswith("_bias") and pname != "dt_bias":
        return "bias (never scored)"
    if _is_norm(mod) and not _is_linear(mod):
        return "norm weight (never scored)"
    if in_router:
        return ("router (scored with --include router)" if _is_linear(mod) else
                f"router ({type(mod).__name__}: computes routing weights with its own parameter, not a linear "
                "layer; not scored, also with --include router)")
    if in_experts and p.dim() == 3:
        return FUSED_ON_DISK if not converted else "expert stack whose per-expert layout is not known (not scored)"
    if isinstance(mod, _CONVS):
        return "convolution kernel (not scored)"
    if pname in ("A_log", "D", "dt_bias"):
        return "state-space parameter (not scored)"
    return f"not a linear weight ({type(mod).__name__}.{pname}, {p.dim()}-D; not scored)"


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack, through the model's own interfaces: `get_decoder()`, followed down while
    what it returns has a decoder of its own (a VLM's language model that is itself an
    encoder-decoder, as Florence-2's BART: its `get_decoder()` is the BART decoder)."""
    decoder = model.get_decoder()
    for _ in range(8):
        try:
            inner = decoder.get_decoder() if hasattr(decoder, "get_decoder") else None
        except (AttributeError, TypeError, ValueError, NotImplementedError):
            inner = None  # a decoder layer stack's generic get_decoder() may raise: it has no inner decoder
        if not isinstance(inner, nn.Module) or inner is decoder:
            break
        decoder = inner
    return decoder


def other_stacks(model: nn.Module, skip: list[str]) -> list[str]:
    """Module paths of layer stacks outside `skip` (the decoder layers, the vision tower): an
    encoder-decoder's encoder layers, other towers; ModuleLists of the model's `_no_split_modules`."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    out: list[str] = []
    for name, mod in model.named_modules():
        if _inside(name, set(skip)) or any(name.startswith(f"{o}.") for o in out):
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) and type(mod[0]).__name__ in no_split:
            out.append(name)
    return out


def moe_parts(layer: nn.Module) -> tuple[set[str], set[str]]:
    """(router modules, experts modules) of one decoder layer, as paths inside it.

    A mixture-of-experts block is a module with an experts child (registered as `experts`, or of a
    class named `...Experts`: transformers' MixtralExperts, GptOssExperts, ...). Its router is the
    child it calls to choose the experts: registered as `gate` or `router` (the names every
    transformers MoE block uses), or of a class named `...Router`/`...Gate`/`...Gating`. A linear
    that only scales a shared expert (`shared_expert_gate`) is not a router."""
    routers, experts = set(), set()
    for name, mod in layer.named_modules():
        children = dict(mod.named_children())
        stacks = [c for c, m in children.items() if c == "experts" or type(m).__name__.lower().endswith("experts")]
        experts |= {_join(name, c) for c in stacks}
        for c, m in children.items() if stacks else ():
            cls = type(m).__name__.lower()
            if c not in stacks and (c in ("gate", "router") or "router" in cls or "gating" in cls or cls.endswith("gate")):
                routers.add(_join(name, c))
    return routers, experts
