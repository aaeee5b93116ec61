"""Regenerate examples/tiny-llava: a small random LLaVA-architecture checkpoint.

It exists so the quick start and the tests run offline: a CLIP-style vision
tower, a 2-layer MLP projector and a 4-layer Llama decoder built from
transformers configs, plus a byte-level BPE tokenizer trained on a few
sentences with the `tokenizers` library, and a LlavaProcessor that AutoProcessor loads. About 1.5 MB.

    python examples/make_tiny_llava.py [OUT_DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a picture of a red circle next to a blue square",
    "what colour is the shape in the image",
    "count the triangles and answer with a number",
    "reverse the list of letters and copy the digits",
    "one two three four five six seven eight nine ten",
    "the model keeps what it learned before fine tuning",
]


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return fast


def build(out: Path, seed: int = 0) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(out)
    vocab = len(tokenizer)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )
    n_patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        image_seq_length=n_patches,
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The processor (tokenizer + CLIP image processor + LlavaProcessor settings), so that
    # transformers.AutoProcessor loads it and `dowser probe --images` can expand <image>.
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=str(Path(__file__).parent / "tiny-llava"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    build(Path(args.out), args.seed)
    print(f"wrote {args.out}")
