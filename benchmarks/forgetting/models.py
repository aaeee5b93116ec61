"""The two tiny models, built from transformers configs and saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

from .tasks import IMAGE_SIZE, IMAGE_TOKENS, MEAN, PATCH, STD
from .tokenizer import BOS, EOS, IMAGE, PAD, VOCAB, build_tokenizer

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def text_config(size: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=size["hidden"], intermediate_size=size["mlp"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
        max_position_embeddings=128,  # room for dowser's 64-token probes
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
    )


def build(kind: str, size: dict, seed: int):
    from transformers import CLIPVisionConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    if kind == "lm":
        return LlamaForCausalLM(text_config(size))
    vision = CLIPVisionConfig(hidden_size=size["vision"], intermediate_size=2 * size["vision"], num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    cfg = LlavaConfig(vision_config=vision, text_config=text_config(size), image_token_index=IMAGE,
                      image_seq_length=IMAGE_TOKENS, vision_feature_layer=-1, vision_feature_select_strategy="default",
                      tie_word_embeddings=False)
    return LlavaForConditionalGeneration(cfg)


def load(path):
    from transformers import AutoConfig, LlamaForCausalLM, LlavaForConditionalGeneration

    cls = LlavaForConditionalGeneration if AutoConfig.from_pretrained(path).model_type == "llava" else LlamaForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32)


def save(model, path: Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    if model.config.model_type == "llava":
        processor(model.config).save_pretrained(path)
    return path


def processor(config):
    """The LLaVA processor of a benchmark VLM: `AutoProcessor.from_pretrained(folder)` loads it.

    Its image processor resizes to 32x32, rescales to [0, 1] and normalises with CLIP's mean
    and std, which is what `tasks.collate` does to the drawn images; `<image>` expands to
    (32 / patch)^2 tokens (the CLS feature is dropped, strategy "default"). The Pillow
    backend, so torchvision is not needed.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                   image_mean=MEAN.flatten().tolist(), image_std=STD.flatten().tolist())
    return LlavaProcessor(image_processor=images, tokenizer=build_tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy=config.vision_feature_select_strategy, image_token="<image>",
                          num_additional_image_tokens=1)


def decoder_layers(model):
    return model.get_decoder().layers


def tune_only(model, last: int) -> list[torch.nn.Parameter]:
    """Freeze everything except the linear weights of the last `last` decoder layers."""
    model.requires_grad_(False)
    layers = decoder_layers(model)
    params = []
    for layer in list(layers)[len(layers) - last:]:
        for name, p in layer.named_parameters():
            if name.rsplit(".", 2)[-2] in PROJ:
                p.requires_grad_(True)
                params.append(p)
    return params
