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
    assert len(a.layers) == a.text_config.num_hidden_layers
    assert a.embed is not None and a.head is not None
    model = a.model
    for i in range(len(a.layers)):
        weights = a.decoder_weights(i)
        # every linear module of the layer is scored (as one weight, or one per expert and projection)
        linears = [n for n, m in a.layers[i].named_modules()
                   if isinstance(m, (torch.nn.Linear, transformers.pytorch_utils.Conv1D))]
        plain = [w for w in weights if w.expert is None]
        assert len(plain) == len(linears)
        for w in weights:
            shape = a.shapes[w.key]
            assert len(shape) == 2 and w.key in a.keys.param_of
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
    assert bool(a.tied) == (name in TIED), a.tied


TIED = {"gemma2", "gemma3_text", "gemma3", "gpt2", "paligemma", "internvl"}  # as these families ship
