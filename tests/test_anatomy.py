"""The anatomy of a checkpoint comes from its transformers class: no per-family table."""

import pytest
import torch

from dowser_tool import DowserError, open_checkpoint
from dowser_tool.model.anatomy import Anatomy
from dowser_tool.model.keys import KeyRules, NameMap, match_names

from .families import FAMILIES, build
from .models import make_llava


def in_memory_names(folder, auto="AutoModelForImageTextToText"):
    import transformers
    from transformers import AutoConfig

    with torch.device("meta"):
        model = getattr(transformers, auto).from_config(AutoConfig.from_pretrained(folder))
    return {n for n, _ in model.named_parameters()}


def anatomy_of(folder):
    ckpt = open_checkpoint(folder)
    return Anatomy.of(ckpt.config, {n: ckpt.shape(n) for n in ckpt.tensor_names()}, str(folder))


def test_llava_legacy_keys_fold_to_in_memory_names(llava_dir):
    ckpt = open_checkpoint(llava_dir)
    assert any(n.startswith("language_model.model.layers.") for n in ckpt.tensor_names())  # legacy on disk
    rules = KeyRules.of_config(ckpt.config, str(llava_dir))
    nm = NameMap(ckpt.tensor_names(), rules)
    assert set(nm.canonical_names()) == in_memory_names(llava_dir)
    assert nm.to_checkpoint("model.language_model.layers.1.mlp.up_proj.weight") == (
        "language_model.model.layers.1.mlp.up_proj.weight")
    assert nm.to_checkpoint("lm_head.weight") == "language_model.lm_head.weight"
    # the probe's key map agrees with transformers' loading
    a = anatomy_of(llava_dir)
    assert set(a.keys.sources) == in_memory_names(llava_dir)


def test_every_layout_of_one_tensor_folds_to_one_name():
    rules = KeyRules.of_config({"model_type": "llava"}, "llava")
    for disk in ["language_model.model.layers.0.self_attn.q_proj.weight",
                 "model.language_model.layers.0.self_attn.q_proj.weight",
                 "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"]:
        assert rules.canonical(disk) == "model.language_model.layers.0.self_attn.q_proj.weight", disk
    assert rules.canonical("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == (
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight")
    assert rules.canonical("multi_modal_projector.linear_1.weight") == "model.multi_modal_projector.linear_1.weight"
    assert rules.canonical("language_model.lm_head.weight") == "lm_head.weight"
    qwen = KeyRules.of_config({"model_type": "qwen2_vl"}, "qwen2_vl")
    assert qwen.canonical("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert qwen.canonical("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"


def test_tied_head_reads_the_embedding(tmp_path):
    d = make_llava(tmp_path / "tied", tie=True)
    ckpt = open_checkpoint(d)
    assert not any("lm_head" in n for n in ckpt.tensor_names())  # absent from the file
    rules = KeyRules.of_config(ckpt.config, str(d))
    nm = NameMap(ckpt.tensor_names(), rules)
    assert "lm_head.weight" in nm and nm.to_checkpoint("lm_head.weight") == "language_model.model.embed_tokens.weight"
    roles = rules.roles(ckpt.tensor_names())
    assert roles.tied and roles.head == roles.embedding == "language_model.model.embed_tokens.weight"


def test_ambiguous_names_and_unknown_families():
    rules = KeyRules.of_config({"model_type": "llava"}, "llava")
    with pytest.raises(DowserError, match="both map to"):
        NameMap(["language_model.model.norm.weight", "model.language_model.norm.weight"], rules, where="ft")
    unknown = KeyRules.of_config({"model_type": "no-such-family"}, "x")
    assert not unknown.known
    assert unknown.canonical("base_model.model.a.b.base_layer.weight") == "a.b.weight"  # PEFT folding only
    assert match_names(["a.weight"], ["base_model.model.a.weight"], unknown) == ({"a.weight": "base_model.model.a.weight"}, [])
    with pytest.raises(DowserError, match="no transformers class for model_type 'no-such-family'"):
        Anatomy.of({"model_type": "no-such-family"}, {}, "x")


def test_key_that_maps_to_no_parameter_is_refused(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(llama_dir / "model.safetensors"))
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((llama_dir / "config.json").read_text())
    save_file(sd, str(tmp_path / "m" / "model.safetensors"), {"format": "pt"})
    with pytest.raises(DowserError, match="'model.layers.0.mlp.extra_proj.weight' maps to no parameter"):
        anatomy_of(tmp_path / "m")


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if not n.startswith("nvila")])
def test_anatomy_of_every_family(tmp_path, name):
    """Layers, embedding, head and scored weights found through transformers' interfaces alone."""
    import transformers

    folder = build(name, tmp_path / name)
    a = anatomy_of(folder)
    assert len(a.layers) == (getattr(a.text_config, "decoder_layers", None) or a.text_config.num_hidden_layers)
    assert a.embed is not None and a.head is not None
    model = a.model
    for i in range(len(a.layers)):
        weights = a.decoder_weights(i)
        # every linear module of the layer is scored (as one weight, or one per expert and projection)
        linears = [n for n, m in a.layers[i].named_modules()
                   if isinstance(m, (torch.nn.Linear, transformers.pytorch_utils.Conv1D))]
        plain = [w for w in weights if w.kind != "expert"]  # not a per-expert slice, nor a stored 3-D stack
        assert len(plain) == len(linears)
        routers, _ = a.moe_parts(i)
        assert {w.module for w in weights if w.kind == "router"} <= {f"{a.layers_path}.{i}.{r}" for r in routers}
        unscored = a.unscored(i)
        assert not set(unscored) & {w.key for w in weights}
        for w in weights:
            shape = a.shapes[w.key]
            assert len(shape) == (3 if w.kind == "expert" and w.expert is None else 2) and w.key in a.keys.param_of
            if w.expert is not None:  # a per-expert tensor inside its fused 3-D parameter
                fused = model.get_parameter(w.param)
                assert w.rows[1] - w.rows[0] == shape[0] and fused.shape[0] > w.expert
    if name == "gpt2":
        assert all(w.transposed for i in range(len(a.layers)) for w in a.decoder_weights(i))
    if name in ("qwen3_moe", "mixtral"):
        experts = [w for i in range(len(a.layers)) for w in a.decoder_weights(i) if w.expert is not None]
        assert all(w.kind == "expert" for w in experts)
        fused = [w for w in experts if w.param.endswith("gate_up_proj")]  # gate rows first, then up
        assert fused and {w.rows for w in fused} == {(0, fused[0].rows[1] - fused[0].rows[0]),
                                                     (fused[0].rows[1] - fused[0].rows[0], 2 * (fused[0].rows[1] - fused[0].rows[0]))}
    if FAMILIES[name].kind == "vlm":
        assert a.vision_encoder is not None and a.vision_layers
    for v in a.vision_layers:  # blocks, not patch-embedding convolutions
        assert any(isinstance(m, torch.nn.Linear) for m in model.get_submodule(v).modules()), v
    if name == "florence2":  # DaViT: one list of blocks per stage
        assert a.vision_layers == ["model.vision_tower.blocks.0.0", "model.vision_tower.blocks.1.0"]
    assert bool(a.tied) == (name in TIED), a.tied


TIED = {"gemma2", "gemma3_text", "gemma3", "gpt2", "paligemma", "internvl", "lfm2", "florence2", "gemma3n_text",
        "ovis2"}  # as these ship


# ---- issue 21: what is scored is decided by what a module is --------------------------------------------------
HYBRIDS = {  # family: (decoder-layer linears that must be scored, tensors listed with the reason's first word)
    "lfm2": (["model.layers.0.conv.in_proj.weight", "model.layers.0.conv.out_proj.weight",
              "model.layers.0.feed_forward.w2.weight"],
             {"model.layers.0.conv.conv.weight": "convolution"}),
    "jamba": (["model.layers.0.mamba.in_proj.weight", "model.layers.0.mamba.x_proj.weight",
               "model.layers.0.mamba.dt_proj.weight", "model.layers.0.mamba.out_proj.weight",
               "model.layers.0.feed_forward.down_proj.weight", "model.layers.1.feed_forward.experts.3.down_proj.weight"],
              {"model.layers.0.mamba.conv1d.weight": "convolution", "model.layers.0.mamba.A_log": "state-space",
               "model.layers.0.mamba.D": "state-space", "model.layers.1.feed_forward.router.weight": "router"}),
    "qwen3_next": (["model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.0.linear_attn.in_proj_ba.weight",
                    "model.layers.0.linear_attn.out_proj.weight", "model.layers.0.mlp.shared_expert.up_proj.weight",
                    "model.layers.0.mlp.shared_expert_gate.weight", "model.layers.1.mlp.experts.0.gate_proj.weight"],
                   {"model.layers.0.linear_attn.conv1d.weight": "convolution",
                    "model.layers.0.linear_attn.A_log": "state-space", "model.layers.0.linear_attn.dt_bias": "state-space",
                    "model.layers.0.mlp.gate.weight": "router"}),
    "granitemoehybrid": (["model.layers.0.mamba.in_proj.weight", "model.layers.0.mamba.out_proj.weight",
                          "model.layers.0.shared_mlp.input_linear.weight"],
                         {"model.layers.0.mamba.conv1d.weight": "convolution",
                          "model.layers.0.mamba.dt_bias": "state-space",
                          "model.layers.0.block_sparse_moe.router.layer.weight": "router"}),
}


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_every_layer_kind_is_scored_by_what_its_modules_are(tmp_path, name):
    """Mamba, short-convolution and linear-attention projections and shared experts are scored (not taken for
    routers because a convolution kernel's first dimension equals their output size); convolution kernels and
    state-space parameters are listed with their reason, never as fused experts; routers are the MoE block's."""
    a = anatomy_of(build(name, tmp_path / name))
    scored = {w.key: w for i in range(len(a.layers)) for w in a.decoder_weights(i)}
    unscored = {k: r for i in range(len(a.layers)) for k, r in a.unscored(i).items()}
    must, listed = HYBRIDS[name]
    for key in must:
        assert key in scored and scored[key].kind != "router", key
    for key, reason in listed.items():
        assert unscored.get(key, "").startswith(reason), (key, unscored.get(key))
    assert not any(w.kind == "router" for w in scored.values())  # every router here is a ...TopKRouter module
    stacks = [k for k, shape in a.shapes.items() if len(shape) == 3 and ".conv" not in k]  # experts stored fused
    assert all(k in scored or unscored.get(k, "").startswith("fused") for k in stacks), stacks


def test_config_with_infinite_limit_is_read_as_transformers_reads_it(tmp_path):
    """GraniteMoeHybrid saved by save_pretrained: time_step_limit [0.0, {"__float__": "Infinity"}] in config.json."""
    import json
    import math

    folder = build("granitemoehybrid", tmp_path / "g")
    raw = json.loads((folder / "config.json").read_text())
    assert raw["time_step_limit"][1] == {"__float__": "Infinity"}
    a = anatomy_of(folder)
    assert math.isinf(a.model.config.time_step_limit[1])


def test_encoder_decoder_scores_the_decoder_stack(tmp_path):
    """Florence-2: get_decoder() leads to BART's decoder; the encoder stack is named as not scored."""
    a = anatomy_of(build("florence2", tmp_path / "f"))
    assert a.layers_path == "model.language_model.decoder.layers" and len(a.layers) == 2
    assert a.other_stacks == ["model.language_model.encoder.layers"]
    assert "model.language_model.encoder.layers" in a.stack_note()
    outside = a.unscored_outside()
    assert outside and all(k.startswith("model.language_model.encoder.layers.0.") for k in outside)
    assert any("encoder_attn" in w.key for w in a.decoder_weights(0))  # cross-attention is scored
    assert not [w for w in a.stem_weights("projector") if ".encoder.layers." in w.key]


def test_experts_land_on_their_own_slices_when_some_are_missing(tmp_path):
    """Per-expert tensors are placed by the number in their name, not their position in the set: a mask set
    holding experts 1 and 3 only (a sidecar of part of a model) maps to slices 1 and 3 of the fused parameter."""
    from transformers import AutoModelForCausalLM

    folder = build("mixtral", tmp_path / "mixtral")
    rules = KeyRules.of_model(AutoModelForCausalLM.from_pretrained(folder))
    stem = "model.layers.0.block_sparse_moe.experts"
    full = {f"{stem}.{e}.{p}.weight": (16 if p != "w2" else 32, 32 if p != "w2" else 16)
            for e in range(4) for p in ("w1", "w2", "w3")}
    shapes = {k: s for k, s in full.items() if f".{1}." in k or f".{3}." in k}
    placed = rules.expert_placement(shapes)
    assert placed == {k: v for k, v in rules.expert_placement(full).items() if k in shapes}
    assert {placed[f"{stem}.{e}.w1.weight"][1] for e in (1, 3)} == {1, 3}
    assert placed[f"{stem}.3.w3.weight"][2] == placed[f"{stem}.1.w3.weight"][2] == (16, 32)  # gate rows, then up
