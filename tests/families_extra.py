"""Tiny checkpoints of families issue 21 adds beside tests/families.py (which stays as it is):
Ovis2 with its processor, GPT-OSS (experts stored fused on disk), Gemma 3n text (K/V shared
across layers), and processor folders that disagree with their model, all built offline.

    from tests.families_extra import build_extra
    folder = build_extra("ovis2", tmp_path / "ovis2")
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.families import _ids, _processor, _qwen_tok, _text_sub, _vlm

OVIS_SPECIALS = ["<image>", "<IMG_START>", "<IMG_ATOM>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]


def _build_ovis2(out: Path, seed: int = 0) -> Path:
    """AIDC-AI/Ovis2-1B-hf: AIMv2-like ViT, hidden_stride 2 (4 tokens per 16 px image), a visual-vocabulary
    embedding table (image features are soft tokens over it), visual indicator tokens
    <IMG_START>/<IMG_GRID>/<IMG_COL>/<IMG_ROW>/<IMG_END> with their own embeddings, Qwen2."""
    from transformers import Ovis2ImageProcessorPil

    tok = _qwen_tok(OVIS_SPECIALS, chat_template=None)
    ip = Ovis2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=False)
    proc = _processor("Ovis2Processor", image_processor=ip, tokenizer=tok, image_seq_length=4)
    ids = _ids(tok, atom="<IMG_ATOM>", start="<IMG_START>", grid="<IMG_GRID>", col="<IMG_COL>",
               row="<IMG_ROW>", end="<IMG_END>")
    text = _text_sub("qwen2", tok)
    vision = dict(model_type="ovis2_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, hidden_stride=2, vocab_size=64,
                  num_visual_indicator_tokens=5)
    return _vlm("ovis2", tok, proc, out, seed, text_config=text, vision_config=vision,
                image_token_id=ids["atom"], hidden_size=text["hidden_size"], vocab_size=text["vocab_size"],
                visual_indicator_token_ids=[ids[k] for k in ("start", "grid", "col", "row", "end")])


def _tiny_causal(model_type: str, out: Path, seed: int, **cfg) -> Path:
    """A tokenizer-less causal LM (vocab 128, hidden 64): probes start from the config's BOS."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**common, **cfg}))
    model.save_pretrained(out)
    return out


def _build_gemma3n_text(out: Path, seed: int = 0) -> Path:
    """google/gemma-3n-E2B text stack: 4 layers, the last 2 reuse the K/V of layers 0 (sliding) and 1 (full)
    (kv sharing through one KVSharingDict), per-layer inputs, AltUp (2 streams), LAuReL."""
    return _tiny_causal("gemma3n_text", out, seed, num_hidden_layers=4, num_kv_shared_layers=2,
                        hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                        intermediate_size=[128] * 4, activation_sparsity_pattern=[0.0] * 4, head_dim=16,
                        laurel_rank=8, altup_num_inputs=2)


def _build_gpt_oss(out: Path, seed: int = 0) -> Path:
    """openai/gpt-oss-20b: experts stored fused on disk, (experts, in, out) per expert
    (`gate_up_proj` with gate/up interleaved, `down_proj`, with biases); router module; attention sinks."""
    return _tiny_causal("gpt_oss", out, seed, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                        head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=8)


def _build_qwen3_vl_moe(out: Path, seed: int = 0) -> Path:
    """Qwen/Qwen3-VL-30B-A3B-Instruct: Qwen3-VL (DeepStack) with MoE text layers whose experts are stored as
    3-D tensors (experts, in, out); transformers loads them through a converter that transposes them."""
    from tests.families import QWEN3_VL_CHAT, QWEN_VISION_SPECIALS
    from transformers import Qwen2VLImageProcessor

    tok = _qwen_tok(QWEN_VISION_SPECIALS, chat_template=None)
    ip = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                               size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32})
    proc = _processor("Qwen3VLProcessor", "Qwen3VLVideoProcessor", image_processor=ip, tokenizer=tok,
                      chat_template=QWEN3_VL_CHAT)
    text = _text_sub("qwen3_vl_moe_text", tok, layers=2, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=24, decoder_sparse_step=1,
                     rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 5e6,
                                      "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    return _vlm("qwen3_vl_moe", tok, proc, out, seed, text_config=text, vision_config=vision, **ids)


def _build_qwen3_vl_moe_hub(out: Path, seed: int = 0) -> Path:
    """Qwen3-VL-MoE as the Hub checkpoints store it: every expert stack (experts, in, out), the transpose of
    the model's (experts, out, in); transformers' loading converter transposes it back."""
    from safetensors.torch import load_file, save_file

    _build_qwen3_vl_moe(out, seed)
    path = Path(out) / "model.safetensors"
    tensors = load_file(str(path))
    for k in [k for k in tensors if ".mlp.experts." in k and tensors[k].dim() == 3]:
        tensors[k] = tensors[k].transpose(1, 2).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return out


EXTRA = {"qwen3_vl_moe": _build_qwen3_vl_moe, "qwen3_vl_moe_hub": _build_qwen3_vl_moe_hub, "ovis2": _build_ovis2, "gemma3n_text": _build_gemma3n_text, "gpt_oss": _build_gpt_oss}


def build_extra(name: str, out: Path, seed: int = 0) -> Path:
    return EXTRA[name](Path(out), seed)
