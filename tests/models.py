"""Tiny models built from transformers configs, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

EXAMPLE_LLAVA = Path(__file__).resolve().parents[1] / "examples" / "tiny-llava"


def llama_config(layers: int = 2, hidden: int = 32, vocab: int = 96, tie: bool = False, model_type: str = "llama"):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )


def save_model(model, out: Path, dtype=None, shard_size=None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def make_llama(out: Path, seed: int = 0, dtype=None, shard_size=None, **cfg) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(**cfg)).eval()
    return save_model(model, out, dtype, shard_size)


def make_llava(out: Path, seed: int = 0, dtype=None, shard_size=None, layers: int = 2, tie: bool = False) -> Path:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = llama_config(layers=layers, tie=tie)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=95, image_seq_length=4,
                      vision_feature_layer=-2, tie_word_embeddings=tie)
    model = LlavaForConditionalGeneration(cfg).eval()
    return save_model(model, out, dtype, shard_size)
