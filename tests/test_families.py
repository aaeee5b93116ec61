"""The tiny checkpoints of tests/families.py load back with transformers' Auto classes and run.

Per family: no missing/unexpected/mismatched keys, a save -> load -> save round trip is bit-exact, a text forward;
per VLM: the processor turns a noise image + the family's prompt into inputs the model's forward takes, the image
expands to the number of image tokens listed below, and a different image changes the logits; NVILA: the llm/
part and the ``llm.``-stripped flat keys load into Qwen2ForCausalLM.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from .families import (FAMILIES, NVILA_IMAGE, NVILA_MEDIA, NVILA_MM, NVILA_PATCH, _nvila_projector, build,
                       has_video_slot, load_processor, noise_image)

TORCHVISION = importlib.util.find_spec("torchvision") is not None
NUM2WORDS = importlib.util.find_spec("num2words") is not None

MATRIX = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "qwen3_moe", "mixtral",
          "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm",
          "paligemma", "gemma3", "internvl", "mllama", "mistral3", "nvila_folder", "nvila_hf",
          "lfm2", "jamba", "qwen3_next", "granitemoehybrid", "gpt_oss", "llama4_text", "gemma3n_text", "qwen2_reward",
          "florence2", "ovis2"]
TEXT = [n for n in MATRIX if FAMILIES[n].kind == "text"]
VLM = [n for n in MATRIX if FAMILIES[n].kind == "vlm" and not n.startswith("nvila")]
TIED = {"gemma2", "gemma3_text", "gpt2", "paligemma", "gemma3", "internvl", "lfm2", "florence2", "gemma3n_text", "ovis2"}
# text-config facts each fixture is built to have (layers that differ from layer 0)
LAYOUT = {
    "mistral": {"sliding_window": 8},
    "qwen2": {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"], "sliding_window": 8},
    "qwen3": {"layer_types": ["full_attention", "sliding_attention", "full_attention"], "sliding_window": 8},
    "gemma2": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 8},
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                    "sliding_window": 8},
    "gemma3": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 8},
    "qwen3_moe": {"mlp_only_layers": [0], "num_experts": 4},
    "mixtral": {"num_local_experts": 4},
    "mllama": {"cross_attention_layers": [1], "num_hidden_layers": 3},
    "qwen3_vl": {"num_hidden_layers": 3},
}
# processors that transformers 5.24 cannot build without torchvision (video slot, or PixtralProcessor itself)
NEEDS_TORCHVISION = {"llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "internvl", "mistral3"}
BASE = {"input_ids", "attention_mask", "pixel_values"}
QWEN = BASE | {"mm_token_type_ids", "image_grid_thw"}
# per VLM: image tokens (config.image_token_id) one noise image expands to, and the processor's outputs
EXPECT = {
    "llava": (4, BASE),
    "llava_next": (10, BASE | {"image_sizes"}),
    "llava_onevision": (10, BASE | {"image_sizes", "batch_num_images"}),
    "qwen2_vl": (4, QWEN),
    "qwen2_5_vl": (16, QWEN),
    "qwen3_vl": (4, QWEN),
    "idefics3": (20, BASE | {"pixel_attention_mask"}),
    "smolvlm": (20, BASE | {"pixel_attention_mask"}),
    "paligemma": (4, BASE | {"token_type_ids", "labels"}),
    "gemma3": (4, BASE | {"token_type_ids"}),
    "internvl": (4, BASE),
    "mllama": (1, BASE | {"cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"}),
    "mistral3": (4, BASE | {"image_sizes"}),
    "ovis2": (4, BASE),
}
USER_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(name) / name)
        return cache[name]

    return get


def _load(auto_cls, folder):
    model, info = auto_cls.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    return model.eval()


def _assert_round_trip(model, folder, tmp_path):
    """Saving the loaded model again gives the same tensors under the same names as the fixture's file."""
    model.save_pretrained(tmp_path / "again")
    original, again = load_file(folder / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(original) == sorted(again)
    for key, tensor in original.items():
        assert tensor.dtype == again[key].dtype and torch.equal(tensor, again[key]), key


def _assert_common(name, folder, model, tok):
    for file in ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"):
        assert (folder / file).is_file(), file
    text_cfg = model.config.get_text_config()
    assert len(tok) <= text_cfg.vocab_size <= 1400  # PaliGemma's processor adds 1152 <loc>/<seg> tokens
    assert all(i < text_cfg.vocab_size for i in tok.all_special_ids)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (name in TIED)
    for key, value in LAYOUT.get(name, {}).items():
        assert getattr(text_cfg, key) == value, key
    zeros = [k for k, v in load_file(folder / "model.safetensors").items() if v.ndim >= 2 and not v.any()]
    assert zeros == []


def _text_forward(model, tok, vocab):
    ids = tok("the quick brown fox jumps over the lazy dog twice", return_tensors="pt")
    assert ids["input_ids"].shape[1] > 16  # longer than every sliding window
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], vocab) and torch.isfinite(logits).all()


def test_matrix_is_registered():
    assert sorted(FAMILIES) == sorted(MATRIX)
    assert all(f.notes and f.kind in {"text", "vlm", "seq2seq", "reward"} for f in FAMILIES.values())


@pytest.mark.parametrize("name", [n for n in MATRIX if FAMILIES[n].kind == "seq2seq"])
def test_seq2seq_family(name, built, tmp_path):
    """An encoder-decoder: the text goes to the encoder and, as decoder_input_ids, to the decoder."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    folder = built(name)
    model = _load(AutoModelForImageTextToText, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    _assert_common(name, folder, model, tok)
    ids = tok("the quick brown fox jumps over the lazy dog twice", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    _assert_round_trip(model, folder, tmp_path)


def _checked(name, folder, auto_cls, tmp_path):
    """Load ``folder`` with ``auto_cls`` and its tokenizer; common checks, a text forward, the round trip."""
    from transformers import AutoTokenizer

    model = _load(auto_cls, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    _assert_common(name, folder, model, tok)
    _text_forward(model, tok, model.config.get_text_config().vocab_size)
    _assert_round_trip(model, folder, tmp_path)
    return model, tok


@pytest.mark.parametrize("name", TEXT)
def test_text_family(name, built, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = _checked(name, built(name), AutoModelForCausalLM, tmp_path)
    if tok.chat_template is not None:
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
        assert "hi" in rendered and tok.unk_token_id not in tok(rendered, add_special_tokens=False)["input_ids"]


def test_moe_experts_are_stored_per_expert(built):
    qwen = load_file(built("qwen3_moe") / "model.safetensors")
    assert {f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")} \
        <= set(qwen)
    assert not any(k.startswith("model.layers.0.mlp.experts") for k in qwen)  # layer 0 is dense
    mixtral = load_file(built("mixtral") / "model.safetensors")
    assert {f"model.layers.0.block_sparse_moe.experts.{e}.w{i}.weight" for e in range(4) for i in (1, 2, 3)} \
        <= set(mixtral)


def _prompt(name, processor):
    if name == "paligemma":  # a pretraining checkpoint: no chat template, the prompt is the task prefix
        return "<image>caption en"
    if name == "smolvlm":  # SmolVLMProcessor.apply_chat_template reads the (absent) video processor
        return processor.tokenizer.apply_chat_template(USER_IMAGE, chat_template=processor.chat_template,
                                                        tokenize=False, add_generation_prompt=True)
    return processor.apply_chat_template(USER_IMAGE, add_generation_prompt=True)


def _mistral3_inputs(folder, image):
    """Without torchvision PixtralProcessor cannot be imported: the inputs it would make, from the saved image
    processor and tokenizer, with [IMG] expanded as PixtralProcessor.replace_image_token does (a row of [IMG] per
    2x2-merged patch row, each ended by [IMG_BREAK], the last by [IMG_END])."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tok, ip = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    processor_cfg = json.loads((folder / "processor_config.json").read_text())
    pixels = ip(images=[image], return_tensors="pt")
    step = processor_cfg["patch_size"] * processor_cfg["spatial_merge_size"]
    height, width = pixels["image_sizes"][0].tolist()
    tokens = ("[IMG]" * (width // step) + "[IMG_BREAK]") * (height // step)
    tokens = tokens[: -len("[IMG_BREAK]")] + "[IMG_END]"
    prompt = tok.apply_chat_template(USER_IMAGE, tokenize=False).replace("[IMG]", tokens, 1)
    text = tok(prompt, add_special_tokens=False, return_tensors="pt")
    return {**text, **pixels}


def _processor_or_inputs(name, folder):
    """(processor or None, function image -> model inputs), after checking AutoProcessor loads exactly when
    transformers 5.24 can build this processor here."""
    from transformers import AutoProcessor

    try:
        AutoProcessor.from_pretrained(folder)
    except ImportError as exc:
        missing = "torchvision" if not TORCHVISION else "num2words"
        assert missing in str(exc).lower()
        assert name in NEEDS_TORCHVISION if missing == "torchvision" else name == "smolvlm" and not NUM2WORDS
    else:
        assert TORCHVISION or name not in NEEDS_TORCHVISION
    if name == "mistral3" and not TORCHVISION:
        return None, lambda image: _mistral3_inputs(folder, image)
    processor = load_processor(folder)
    assert has_video_slot(folder) == (name in NEEDS_TORCHVISION - {"mistral3"})
    prompt = _prompt(name, processor)
    # a rendered chat template may already start with BOS; tokenizing it with special tokens would double it
    # (transformers' own apply_chat_template(tokenize=True) passes add_special_tokens=False the same way)
    bos = processor.tokenizer.bos_token
    special = not (bos and prompt.startswith(bos))
    return processor, lambda image: processor(images=[image], text=[prompt], add_special_tokens=special,
                                              return_tensors="pt")


@pytest.mark.parametrize("name", VLM)
def test_vlm_family(name, built, tmp_path):
    from transformers import AutoModelForImageTextToText

    folder = built(name)
    model, tok = _checked(name, folder, AutoModelForImageTextToText, tmp_path)
    text_cfg = model.config.get_text_config()

    processor, make_inputs = _processor_or_inputs(name, folder)
    size = FAMILIES[name].image_size
    inputs = make_inputs(noise_image(size, seed=0))
    image_tokens, keys = EXPECT[name]
    assert set(inputs) == keys
    image_token_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    assert (inputs["input_ids"] == image_token_id).sum().item() == image_tokens
    assert tok.bos_token_id is None or inputs["input_ids"][0, :2].tolist().count(tok.bos_token_id) <= 1
    inputs.pop("labels", None)  # PaliGemma's processor also returns training labels
    with torch.no_grad():
        logits = model(**inputs).logits
        other = model(**{k: v for k, v in make_inputs(noise_image(size, seed=1)).items() if k != "labels"}).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], text_cfg.vocab_size) and torch.isfinite(logits).all()
    assert not torch.equal(logits, other)  # the image reaches the output


def _nvila_projector_shapes(h: int) -> dict:
    mm = NVILA_MM  # docs/NVILA.md, "Projector", mlp_downsample_3x3_fix
    return {"layers.1.weight": (9 * mm,), "layers.1.bias": (9 * mm,), "layers.2.weight": (3 * mm, 9 * mm),
            "layers.2.bias": (3 * mm,), "layers.4.weight": (3 * mm,), "layers.4.bias": (3 * mm,),
            "layers.5.weight": (h, 3 * mm), "layers.5.bias": (h,), "layers.7.weight": (h, h), "layers.7.bias": (h,)}


def test_nvila_folder(built, tmp_path):
    from transformers import AutoTokenizer, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionModel

    folder = built("nvila_folder")
    root = json.loads((folder / "config.json").read_text())
    assert (root["model_type"], root["architectures"]) == ("llava_llama", ["LlavaLlamaModel"])
    assert root["llm_cfg"]["model_type"] == "qwen2" and root["llm_cfg"]["architectures"] == ["Qwen2ForCausalLM"]
    assert root["vision_tower_cfg"]["model_type"] == "siglip_vision_model"
    assert root["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample_3x3_fix"
    assert root["mm_hidden_size"] == NVILA_MM and (folder / "trainer_state.json").is_file()

    llm = _load(Qwen2ForCausalLM, folder / "llm")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings", "layer_types"):
        assert root["llm_cfg"][key] == getattr(llm.config, key), key
    tok = AutoTokenizer.from_pretrained(folder / "llm")
    assert (tok.bos_token, tok.pad_token) == ("[BOS]", "[PAD]") and len(tok) == llm.config.vocab_size
    assert llm.get_output_embeddings().weight is not llm.get_input_embeddings().weight
    _text_forward(llm, tok, llm.config.vocab_size)
    _assert_round_trip(llm, folder / "llm", tmp_path)

    tower = _load(SiglipVisionModel, folder / "vision_tower")
    ip = SiglipImageProcessor.from_pretrained(folder / "vision_tower")
    pixels = ip(images=[noise_image(NVILA_IMAGE)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert hidden[-2].shape == (1, (NVILA_IMAGE // NVILA_PATCH) ** 2, NVILA_MM)

    projector = load_file(folder / "mm_projector" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in projector.items()} == _nvila_projector_shapes(llm.config.hidden_size)


def test_nvila_hf_matches_the_folder_layout(built):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    flat, folder = built("nvila_hf"), built("nvila_folder")
    config = json.loads((flat / "config.json").read_text())
    assert config["model_type"] == "nvila_lite" and "mm_hidden_size" not in config
    tensors = load_file(flat / "model.safetensors")
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"llm", "vision_tower", "mm_projector"}
    assert "llm.lm_head.weight" in tensors and any(k.startswith("llm.model.layers.") for k in tensors)

    parts = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in prefixes}
    llm = Qwen2ForCausalLM(Qwen2Config(**config["text_config"]))
    assert llm.load_state_dict(parts["llm"], strict=True).missing_keys == []
    tower = SiglipVisionModel(SiglipVisionConfig(**config["vision_config"]))
    tower.load_state_dict(parts["vision_tower"], strict=True)
    projector = _nvila_projector(NVILA_MM, config["text_config"]["hidden_size"])
    projector.load_state_dict(parts["mm_projector"], strict=True)

    # same seed, same tensors as the VILA folder layout
    for part, sub in (("llm", "llm"), ("vision_tower", "vision_tower"), ("mm_projector", "mm_projector")):
        on_disk = load_file(folder / sub / "model.safetensors")
        assert sorted(on_disk) == sorted(parts[part])
        assert all(torch.equal(on_disk[k], parts[part][k]) for k in on_disk), part

    tok = AutoTokenizer.from_pretrained(flat)
    assert tok.convert_ids_to_tokens([config["image_token_id"], config["video_token_id"]]) == NVILA_MEDIA[1:]
    # the media tokens follow the LLM vocabulary; VILA swaps them for features before the embedding lookup
    assert len(tok) == config["text_config"]["vocab_size"] + len(NVILA_MEDIA)


def test_build_is_deterministic_in_the_seed(tmp_path):
    first = (build("qwen3_vl", tmp_path / "a", seed=3) / "model.safetensors").read_bytes()
    again = (build("qwen3_vl", tmp_path / "b", seed=3) / "model.safetensors").read_bytes()
    other = (build("qwen3_vl", tmp_path / "c", seed=4) / "model.safetensors").read_bytes()
    assert first == again and first != other
