import pytest
import torch

from dowser_tool import DowserError, open_checkpoint
from dowser_tool.names import NameMap, architecture_for, block_of, canonical_name, scored_names, ties_embeddings

from .models import make_llava


def in_memory_names(folder):
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
    return {n for n, _ in model.named_parameters()}


def test_llava_legacy_checkpoint_keys_fold_to_in_memory_names(llava_dir):
    ckpt = open_checkpoint(llava_dir)
    arch = architecture_for(ckpt.config)
    assert any(n.startswith("language_model.model.layers.") for n in ckpt.tensor_names())  # legacy on disk
    nm = NameMap(ckpt.tensor_names(), arch)
    assert set(nm.canonical_names()) == in_memory_names(llava_dir)
    assert nm.to_checkpoint("model.language_model.layers.1.mlp.up_proj.weight") == (
        "language_model.model.layers.1.mlp.up_proj.weight"
    )
    assert nm.to_checkpoint("lm_head.weight") == "language_model.lm_head.weight"


def test_llava_all_layouts_agree(llava_dir):
    arch = architecture_for(open_checkpoint(llava_dir).config)
    pairs = {
        "language_model.model.layers.0.self_attn.q_proj.weight": "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight": "model.language_model.layers.0.self_attn.q_proj.weight",
        "language_model.layers.0.self_attn.q_proj.weight": "model.language_model.layers.0.self_attn.q_proj.weight",
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight":
            "model.language_model.layers.0.self_attn.q_proj.weight",
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
        "vision_tower.encoder.layers.0.mlp.fc1.weight": "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
        "multi_modal_projector.linear_1.weight": "model.multi_modal_projector.linear_1.weight",
        "language_model.lm_head.weight": "lm_head.weight",
    }
    for disk, canon in pairs.items():
        assert canonical_name(disk, arch) == canon, disk


def test_blocks_and_scored_names(llava_dir):
    ckpt = open_checkpoint(llava_dir)
    arch = architecture_for(ckpt.config)
    nm = NameMap(ckpt.tensor_names(), arch)
    blocks = nm.blocks()
    assert list(k for k in blocks if k.startswith("layers.")) == ["layers.0", "layers.1"]
    assert {"embed", "vision", "projector", "head"} <= set(blocks)
    assert block_of("model.language_model.norm.weight", arch) == "head"
    assert nm.num_layers() == 2
    scored = scored_names(nm)
    assert len(scored) == 14 and all(".layers." in s for s in scored)
    with_head = scored_names(nm, layers=[1], include=("lm_head",))
    assert len(with_head) == 8 and "lm_head.weight" in with_head
    assert len(scored_names(nm, layers=[1])) == 7


def test_tied_embeddings_alias(tmp_path):
    d = make_llava(tmp_path / "tied", tie=True)
    ckpt = open_checkpoint(d)
    arch = architecture_for(ckpt.config)
    assert ties_embeddings(ckpt.config, arch)
    assert not any("lm_head" in n for n in ckpt.tensor_names())  # absent from the file
    nm = NameMap(ckpt.tensor_names(), arch, tied=True)
    assert "lm_head.weight" in nm
    assert nm.to_checkpoint("lm_head.weight") == "language_model.model.embed_tokens.weight"


def test_ambiguous_and_unsupported():
    arch = architecture_for({"model_type": "llava"})
    with pytest.raises(DowserError, match="both map to"):
        NameMap(["language_model.model.norm.weight", "model.language_model.norm.weight"], arch, where="ft")
    with pytest.raises(DowserError, match="unsupported architecture 'gpt2'"):
        architecture_for({"model_type": "gpt2"})


def test_qwen2_vl_layout():
    arch = architecture_for({"model_type": "qwen2_vl"})
    assert canonical_name("model.layers.3.mlp.up_proj.weight", arch) == "model.language_model.layers.3.mlp.up_proj.weight"
    assert canonical_name("visual.blocks.0.attn.qkv.weight", arch) == "model.visual.blocks.0.attn.qkv.weight"
    assert canonical_name("model.language_model.norm.weight", arch) == "model.language_model.norm.weight"
    assert block_of("model.visual.merger.mlp.0.weight", arch) == "projector"
    assert block_of("model.visual.blocks.0.attn.qkv.weight", arch) == "vision"
