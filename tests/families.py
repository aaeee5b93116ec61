"""Tiny random-weight checkpoints of every model family in issue 11's test matrix.

Each family is built from its transformers 5.24 config class at toy size (hidden 32, 2-3 decoder layers, a
vocabulary of about 100-300 tokens, 16-32 px images) and written with ``save_pretrained``: model weights
(``torch.manual_seed(seed)`` then random init), ``config.json``, ``generation_config.json``, a tokenizer built
offline with the ``tokenizers`` library inside the tokenizer class transformers maps the family to, and for VLMs a
processor that ``AutoProcessor.from_pretrained(folder)`` loads and whose outputs the model's ``forward`` accepts.
Where a family has decoder layers that differ (sliding vs full attention, cross-attention, dense vs MoE), it has 3
layers so both kinds appear and layer 1 differs from layer 0.

Tokenizers have no merges: the vocabulary is the family's special tokens, then single characters (the 256-symbol
byte-level alphabet for byte-level BPE families, ``▁`` + printable ASCII + newline for SentencePiece-style
families), so every string encodes.  Special-token strings, image-processor options and chat templates follow the
real Hub processors of the family (named in each builder), scaled down.

NVILA has no transformers class; ``nvila_folder`` and ``nvila_hf`` build the two Hub layouts described in
``docs/NVILA.md`` (sections 1.1, 1.3, 2.1), see ``_build_nvila_folder``.

Usage::

    from tests.families import FAMILIES, build
    folder = build("gemma3_text", tmp_path / "gemma3")       # -> tmp_path / "gemma3"
    FAMILIES["gemma3_text"].kind                               # "text"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# --------------------------------------------------------------------------------------------------- tokenizers


def _tokenizer(cls_name: str, style: str, specials: list[str], named: dict[str, str] | None = None,
               chat_template: str | None = None, **kwargs):
    """A tiny tokenizer of transformers class ``cls_name`` with no merges.

    ``style`` "bytes": vocabulary = ``specials`` + the 256 byte-level symbols (GPT-2/Qwen2/Llama-3 style);
    "spm": ``specials`` + ``▁``, newline and printable ASCII (Llama-2/Gemma SentencePiece-BPE style, unknown
    characters become ``unk``).  Every entry of ``specials`` is registered as a special (never split) token;
    ``named`` gives model-specific names (``image_token``, ``boi_token`` ...) that processors read as tokenizer
    attributes.  ``kwargs`` are the class's own arguments (bos/eos/pad/unk tokens, ``add_bos_token``...).
    """
    import transformers
    from tokenizers import pre_tokenizers

    vocab: dict[str, int] = {}
    for tok in specials:
        vocab.setdefault(tok, len(vocab))
    if style == "bytes":
        chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    else:
        chars = ["▁", "\n"] + [chr(c) for c in range(33, 127)]
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    role_tokens = {str(v) for k, v in kwargs.items() if k.endswith("_token") and v is not None}
    extra = dict(named or {})
    unnamed = [t for t in specials if t not in role_tokens and t not in extra.values()]
    if extra:
        # a dict of named tokens; the unnamed specials are registered after construction
        tok = getattr(transformers, cls_name)(vocab=vocab, merges=[], extra_special_tokens=extra, **kwargs)
        if unnamed:
            tok.add_special_tokens({"extra_special_tokens": unnamed}, replace_extra_special_tokens=False)
    else:
        tok = getattr(transformers, cls_name)(vocab=vocab, merges=[], extra_special_tokens=unnamed, **kwargs)
    assert len(tok) == len(vocab), (cls_name, len(tok), len(vocab))  # every special was in the vocabulary
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def _vocab_size(tok, multiple: int = 8) -> int:
    """Model vocabulary: the tokenizer's length rounded up (real checkpoints pad their embedding matrix too)."""
    n = len(tok)
    return -(-n // multiple) * multiple


def _ids(tok, **names) -> dict[str, int]:
    out = {}
    for key, token in names.items():
        idx = tok.convert_tokens_to_ids(token)
        assert isinstance(idx, int) and idx != tok.unk_token_id, (key, token)
        out[key] = idx
    return out


# Chat templates of the text families, rewritten from the instruction-tuned Hub checkpoints of the family (noted
# per template): same rendered prompt for user/assistant string turns; tool and system-prompt extras left out.
CHATML = (  # Qwen2/2.5 Instruct (ChatML with the default system prompt)
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_NOSYS = (  # Qwen3 (no default system prompt)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2_INST = (  # Llama-2-chat / Mistral-Instruct-v0.x [INST] format
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
GEMMA_TURNS = (  # Gemma 2/3 instruction-tuned
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_CHAT = (  # Phi-3-mini-instruct
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_tok(extra: list[str] = (), named: dict | None = None, chat_template: str | None = CHATML):
    return _tokenizer("Qwen2Tokenizer", "bytes", QWEN_SPECIALS + list(extra), named=named,
                      chat_template=chat_template, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                      unk_token=None)


def _llama2_tok(extra: list[str] = (), chat_template: str | None = LLAMA2_INST, **kwargs):
    kwargs.setdefault("add_bos_token", True)
    return _tokenizer("LlamaTokenizer", "spm", ["<unk>", "<s>", "</s>"] + list(extra), chat_template=chat_template,
                      unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs)


def _gemma_tok(extra: list[str] = (), named: dict | None = None, chat_template: str | None = GEMMA_TURNS):
    return _tokenizer("GemmaTokenizer", "spm", ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
                                                "<start_of_turn>", "<end_of_turn>"] + list(extra),
                      named=named, chat_template=chat_template, add_bos_token=True)


# --------------------------------------------------------------------------------------------------- saving


def _generation_config(cfg, tok):
    from transformers import GenerationConfig

    text = cfg.get_text_config()
    return GenerationConfig(bos_token_id=getattr(text, "bos_token_id", None) or tok.bos_token_id,
                            eos_token_id=getattr(text, "eos_token_id", None) or tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)


def _fill_zero_init(model) -> None:
    """Some parameters start at exactly zero in transformers' init and would cut a path off from the output: the
    Gemma 3 projector matrix (mm_input_projection_weight), Mllama's tanh gates (cross-attention and vision
    positional-embedding gates), InternVL's position embeddings.  Trained checkpoints have them non-zero, so every
    all-zero parameter with 2+ dims is redrawn from normal(0, 0.02) and every all-zero scalar gate from
    uniform(0.5, 1), continuing the seeded generator.  1-D zeros (biases, Gemma's 1 + w norms) stay."""
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.numel() and not param.any():
                if param.ndim >= 2:
                    param.normal_(0.0, 0.02)
                elif param.numel() == 1:
                    param.uniform_(0.5, 1.0)


def _save(make_model, cfg, out: Path, seed: int, tok, processor=None) -> Path:
    """Random-init ``make_model(cfg)`` (a model class or ``AutoModel*.from_config``) under ``torch.manual_seed(seed)``, save model, generation config and
    tokenizer (or processor, which saves its tokenizer) into ``out``."""
    torch.manual_seed(seed)
    model = make_model(cfg).eval()
    _fill_zero_init(model)
    model.generation_config = _generation_config(cfg, tok)
    out = Path(out)
    model.save_pretrained(out)
    if processor is None:
        tok.save_pretrained(out)
    elif getattr(processor, "video_processor", "no slot") is None:
        _save_without_video(processor, out)
    else:
        processor.save_pretrained(out)
    return out


def _text_cfg(model_type: str, tok, layers: int = 2, **overrides):
    from transformers import AutoConfig

    base = dict(vocab_size=_vocab_size(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def _causal_lm(model_type: str, tok, out: Path, seed: int, layers: int = 2, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = _text_cfg(model_type, tok, layers, **overrides)
    return _save(AutoModelForCausalLM.from_config, cfg, out, seed, tok)


# --------------------------------------------------------------------------------------------------- text families

SLIDING = 8  # sliding window (tokens) for the families that have one: smaller than a 16-token probe


def _build_llama(out: Path, seed: int = 0) -> Path:
    return _causal_lm("llama", _llama2_tok(), out, seed)


def _build_mistral(out: Path, seed: int = 0) -> Path:
    return _causal_lm("mistral", _llama2_tok(), out, seed, sliding_window=SLIDING)


def _build_qwen2(out: Path, seed: int = 0) -> Path:
    # layer_types derived by Qwen2Config: layer i slides when i >= max_window_layers -> full, sliding, sliding
    return _causal_lm("qwen2", _qwen_tok(), out, seed, layers=3, use_sliding_window=True, sliding_window=SLIDING,
                      max_window_layers=1)


def _build_qwen3(out: Path, seed: int = 0) -> Path:
    return _causal_lm("qwen3", _qwen_tok(chat_template=CHATML_NOSYS), out, seed, layers=3, use_sliding_window=True,
                      sliding_window=SLIDING, max_window_layers=0,
                      layer_types=["full_attention", "sliding_attention", "full_attention"])


def _build_gemma2(out: Path, seed: int = 0) -> Path:
    # Gemma2Config alternates sliding (even layers) and full (odd layers); soft-capping on
    return _causal_lm("gemma2", _gemma_tok(), out, seed, layers=3, sliding_window=SLIDING, query_pre_attn_scalar=8)


def _build_gemma3_text(out: Path, seed: int = 0) -> Path:
    return _causal_lm("gemma3_text", _gemma_tok(), out, seed, layers=3, sliding_window=SLIDING,
                      query_pre_attn_scalar=8,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                       "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})


def _build_phi3(out: Path, seed: int = 0) -> Path:
    tok = _llama2_tok(["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"],
                      chat_template=PHI3_CHAT, pad_token="<|endoftext|>", add_bos_token=False)
    tok.eos_token = "<|endoftext|>"
    return _causal_lm("phi3", tok, out, seed, num_key_value_heads=4)


def _build_gpt2(out: Path, seed: int = 0) -> Path:
    tok = _tokenizer("GPT2Tokenizer", "bytes", ["<|endoftext|>"], unk_token="<|endoftext|>",
                     bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=_vocab_size(tok), n_positions=512, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _save(GPT2LMHeadModel, cfg, out, seed, tok)


def _build_qwen3_moe(out: Path, seed: int = 0) -> Path:
    # layer 0 dense MLP (mlp_only_layers), layers 1-2 sparse MoE blocks of 4 experts, top-2
    return _causal_lm("qwen3_moe", _qwen_tok(chat_template=CHATML_NOSYS), out, seed, layers=3, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[0], norm_topk_prob=True)


def _build_mixtral(out: Path, seed: int = 0) -> Path:
    return _causal_lm("mixtral", _llama2_tok(), out, seed, num_local_experts=4, num_experts_per_tok=2)


# --------------------------------------------------------------------------------------------------- hybrid layer kinds
# Layer kinds other than attention + MLP (issue 21): short convolutions, Mamba / Mamba2 mixers, gated DeltaNet linear
# attention, routers held as `...TopKRouter` modules, shared experts. Layer 0 is the other kind, layer 1 attention.


def _build_lfm2(out: Path, seed: int = 0) -> Path:
    # LiquidAI/LFM2-350M: ChatML-style byte-level tokenizer with <|startoftext|>; conv layers (short convolution:
    # in_proj -> depthwise conv1d -> out_proj) and attention layers; SwiGLU feed_forward.w1/w2/w3; tied
    tok = _tokenizer("Qwen2Tokenizer", "bytes", ["<|pad|>", "<|startoftext|>", "<|im_start|>", "<|im_end|>"],
                     chat_template=CHATML_NOSYS, bos_token="<|startoftext|>", eos_token="<|im_end|>",
                     pad_token="<|pad|>", unk_token=None)
    return _causal_lm("lfm2", tok, out, seed, layer_types=["conv", "full_attention"], conv_L_cache=3,
                      block_auto_adjust_ff_dim=False, block_ff_dim=64)


def _build_jamba(out: Path, seed: int = 0) -> Path:
    # ai21labs/Jamba: layer 0 Mamba (in_proj, x_proj, dt_proj, out_proj; conv1d, A_log, D) + dense MLP, layer 1
    # attention + MoE (router module feed_forward.router, 4 experts saved per expert, fused in memory)
    return _causal_lm("jamba", _llama2_tok(chat_template=None), out, seed, attn_layer_period=2,
                      attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                      num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2, mamba_d_conv=4,
                      use_mamba_kernels=False)


def _build_qwen3_next(out: Path, seed: int = 0) -> Path:
    # Qwen/Qwen3-Next-80B-A3B: layer 0 gated DeltaNet (linear_attn: in_proj_qkvz, in_proj_ba, conv1d, A_log,
    # dt_bias, out_proj), layer 1 gated full attention; every layer MoE with a shared expert and shared_expert_gate
    return _causal_lm("qwen3_next", _qwen_tok(chat_template=CHATML_NOSYS), out, seed,
                      layer_types=["linear_attention", "full_attention"], num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, shared_expert_intermediate_size=16, linear_num_key_heads=2,
                      linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4)


def _build_granitemoehybrid(out: Path, seed: int = 0) -> Path:
    # ibm-granite/granite-4.0-h-tiny: layer 0 Mamba2 (in_proj, conv1d, A_log, D, dt_bias, gated norm, out_proj), layer
    # 1 attention; every layer MoE with experts stored fused on disk (block_sparse_moe.input_linear/output_linear)
    # and a shared MLP. save_pretrained writes time_step_limit [0.0, {"__float__": "Infinity"}] as transformers does.
    tok = _byte_level_backend(["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|pad|>"],
                              bos_token="<|end_of_text|>", eos_token="<|end_of_text|>", pad_token="<|pad|>")
    return _causal_lm("granitemoehybrid", tok, out, seed, layer_types=["mamba", "attention"], num_local_experts=4,
                      num_experts_per_tok=2, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
                      mamba_d_conv=4, mamba_expand=2, shared_intermediate_size=32)


def _build_florence2(out: Path, seed: int = 0) -> Path:
    # microsoft/Florence-2-base (transformers' florence2): DaViT vision tower + projector into a BART
    # encoder-decoder; get_decoder() leads to the BART decoder (2 layers: self-attention, cross-attention to the
    # encoder, MLP); the BART encoder (1 layer) is a second stack the probe does not score. Tied.
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    tok = _tokenizer("BartTokenizer", "bytes", ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"], bos_token="<s>",
                     pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>", chat_template=None)
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4], window_size=2,
                  drop_path_rate=0.0, projection_dim=32, max_position_embeddings=8, max_temporal_embeddings=4)
    text = dict(model_type="bart", vocab_size=_vocab_size(tok), d_model=32, encoder_layers=1, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_position_embeddings=64, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
                forced_eos_token_id=tok.eos_token_id)
    cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"))
    return _save(Florence2ForConditionalGeneration, cfg, out, seed, tok)


def _build_gpt_oss(out: Path, seed: int = 0) -> Path:
    # openai/gpt-oss-20b: experts stored fused on disk, (experts, in, out) per expert (gate_up_proj with gate/up
    # interleaved, down_proj, with biases); router module; attention sinks; sliding and full layers
    return _causal_lm("gpt_oss", _qwen_tok(chat_template=None), out, seed, hidden_size=64, intermediate_size=128,
                      head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=SLIDING,
                      layer_types=["sliding_attention", "full_attention"])


def _build_llama4_text(out: Path, seed: int = 0) -> Path:
    # meta-llama/Llama-4-Maverick text stack: layer 0 dense MLP, layer 1 MoE (experts in two 3-D tensors multiplied
    # by one torch.bmm over all experts, no declared layout; router; shared expert); layer 1 without RoPE (NoPE)
    return _causal_lm("llama4_text", _llama2_tok(chat_template=None), out, seed, num_local_experts=4,
                      num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=64,
                      interleave_moe_layer_step=2, no_rope_layers=[1, 0])


def _build_gemma3n_text(out: Path, seed: int = 0) -> Path:
    # google/gemma-3n-E2B text stack: 4 layers, the last 2 reuse the K/V of layers 0 (sliding) and 1 (full)
    # (kv sharing through one KVSharingDict), per-layer inputs, AltUp (2 streams), LAuReL
    tok = _llama2_tok(chat_template=None)
    return _causal_lm("gemma3n_text", tok, out, seed, layers=4, hidden_size=64, num_kv_shared_layers=2,
                      hidden_size_per_layer_input=16, vocab_size_per_layer_input=_vocab_size(tok),
                      sliding_window=SLIDING, head_dim=16, laurel_rank=8, altup_num_inputs=2,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                      intermediate_size=[128] * 4, activation_sparsity_pattern=[0.0] * 4)


def build_qwen2_reward(base: Path, out: Path, seed: int = 1) -> Path:
    """A reward model fine-tuned from the Qwen2 checkpoint ``base`` (``_build_qwen2``), as OpenRLHF and TRL save
    one: ``Qwen2ForSequenceClassification`` (num_labels 1, a ``score`` head instead of ``lm_head``), every decoder
    weight moved by seeded noise (scale 1e-2), the score head drawn from the seed."""
    from transformers import Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    model = Qwen2ForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 1e-2) if not name.startswith("score.") else p.normal_(0.0, 0.02)
    out = Path(out)
    model.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------- VLM helpers

NOISE_SIZE = 16  # default side (px) of the noise images the VLM fixtures are sized for; see Family.image_size


def _byte_level_backend(specials: list[str], **kwargs):
    """Llama-3 / Tekken style tokenizer: byte-level BPE saved as a plain ``tokenizer.json`` that transformers loads
    with ``TokenizersBackend`` (the Hub's ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import TokenizersBackend

    vocab: dict[str, int] = {}
    for tok in specials:
        vocab.setdefault(tok, len(vocab))
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    role_tokens = {str(v) for k, v in kwargs.items() if k.endswith("_token") and v is not None}
    tok = TokenizersBackend(tokenizer_object=backend,
                            extra_special_tokens=[t for t in specials if t not in role_tokens], **kwargs)
    assert len(tok) == len(vocab)
    return tok


def _without_video_check():
    """Let a processor with a ``video_processor`` slot be built with ``video_processor=None``.

    transformers 5.24 checks every processor argument against its base class; the video base class only exists
    with torchvision, so without torchvision ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``,
    ``LlavaOnevisionProcessor``, ``InternVLProcessor`` and ``SmolVLMProcessor`` cannot be constructed or loaded at all
    (``AutoProcessor.from_pretrained`` raises ImportError from ``AutoVideoProcessor``).  These fixtures probe
    images only, so they are built without a video processor; inside this context the check accepts ``None``.
    """
    from contextlib import contextmanager

    from transformers.processing_utils import ProcessorMixin

    @contextmanager
    def ctx():
        original = ProcessorMixin.check_argument_for_proper_class

        def check(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return original(self, argument_name, argument)

        ProcessorMixin.check_argument_for_proper_class = check
        try:
            yield
        finally:
            ProcessorMixin.check_argument_for_proper_class = original

    return ctx()


def _save_without_video(processor, out: Path) -> None:
    """``processor.save_pretrained(out)`` for a processor built with ``video_processor=None`` (see
    ``_without_video_check``).  The video entry of ``processor_config.json`` is written as transformers' legacy
    fallback builds it (``AutoVideoProcessor`` reads the image processor's settings when a checkpoint has no video
    config): the image processor's dict with ``video_processor_type`` = the family's video processor class, so that
    ``AutoProcessor.from_pretrained`` finds a video processor config wherever torchvision is installed."""
    from transformers.processing_utils import ProcessorMixin

    cls = type(processor)
    assert "get_attributes" not in cls.__dict__, cls
    cls.get_attributes = classmethod(
        lambda c: [a for a in ProcessorMixin.get_attributes.__func__(c) if a != "video_processor"])
    try:
        processor.save_pretrained(out)
    finally:
        del cls.get_attributes
    path = Path(out) / "processor_config.json"
    saved = json.loads(path.read_text())
    assert saved.pop("video_processor") is None
    video = {k: v for k, v in saved["image_processor"].items() if k != "image_processor_type"}
    saved["video_processor"] = {**video, "video_processor_type": processor.fixture_video_processor_type}
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _processor(cls_name: str, video_processor_type: str | None = None, **kwargs):
    """``transformers.<cls_name>(**kwargs)``; a processor with a video slot is built without a video processor
    (``video_processor_type`` names the class its saved config will ask for)."""
    import transformers

    cls = getattr(transformers, cls_name)
    if "video_processor" in cls.get_attributes():
        assert video_processor_type, cls_name
        with _without_video_check():
            proc = cls(video_processor=None, **kwargs)
        proc.fixture_video_processor_type = video_processor_type
        return proc
    return cls(**kwargs)


def has_video_slot(folder: Path) -> bool:
    """True when the processor saved in ``folder`` has a ``video_processor`` argument (see ``_without_video_check``)."""
    import transformers

    name = json.loads((Path(folder) / "processor_config.json").read_text())["processor_class"]
    return "video_processor" in getattr(transformers, name).get_attributes()


def load_processor(folder: Path):
    """The processor saved in ``folder``: ``AutoProcessor.from_pretrained(folder)`` when it loads; for processors
    with a video slot in an environment without torchvision (ImportError naming torchvision), the same processor
    assembled by transformers' own ``from_args_and_dict`` from ``AutoTokenizer`` + ``AutoImageProcessor`` with no
    video processor.  Raises whatever ``AutoProcessor`` raises otherwise."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(folder)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        try:
            video_slot = has_video_slot(folder)
        except ImportError:  # the processor class itself needs torchvision (PixtralProcessor)
            video_slot = False
        if not video_slot:
            raise
    name = json.loads((Path(folder) / "processor_config.json").read_text())["processor_class"]
    cls = getattr(transformers, name)
    processor_dict, instantiation_kwargs = cls.get_processor_dict(str(folder))
    parts = {"image_processor": AutoImageProcessor.from_pretrained(folder),
             "tokenizer": AutoTokenizer.from_pretrained(folder), "video_processor": None}
    with _without_video_check(), _num2words_for_images():
        return cls.from_args_and_dict([parts[a] for a in cls.get_attributes()], processor_dict,
                                      **instantiation_kwargs)


def _num2words_for_images():
    """``SmolVLMProcessor.__init__`` refuses to run without the ``num2words`` package, which it only uses to spell
    a video's frame count in video prompts.  Inside this context a missing ``num2words`` is replaced by a stand-in
    that raises if a video prompt ever calls it; with the package installed nothing changes."""
    from contextlib import contextmanager

    import transformers.models.smolvlm.processing_smolvlm as module

    def unavailable(*args, **kwargs):
        raise ImportError("num2words is not installed (needed for SmolVLM video prompts only)")

    @contextmanager
    def ctx():
        original = module.num2words
        if original is None:
            module.num2words = unavailable
        try:
            yield
        finally:
            module.num2words = original

    return ctx()


def noise_image(size: int = NOISE_SIZE, seed: int = 0):
    """uint8 numpy array (size, size, 3) of uniform noise."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _vlm(model_type: str, tok, processor, out: Path, seed: int, **cfg) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(model_type, **cfg)
    return _save(AutoModelForImageTextToText.from_config, cfg, out, seed, tok, processor)


def _text_sub(model_type: str, tok, layers: int = 2, **overrides) -> dict:
    """A text sub-config dict (for a VLM's ``text_config``)."""
    return _text_cfg(model_type, tok, layers, **overrides).to_dict()


def _clip_vision(image_size: int = 16, patch_size: int = 8) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=16)


def _siglip_vision(image_size: int = 16, patch_size: int = 8, layers: int = 2) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                num_attention_heads=2, image_size=image_size, patch_size=patch_size, vision_use_head=False)


# Chat templates of the Hub processors.  [V] = the string transformers' own processor tests or modules use for
# that checkpoint (tests/models/<family>/test_processing_*.py, processing_smolvlm.DEFAULT_CHAT_TEMPLATE) or seen
# verbatim in a Hub chat_template.json; [R] = rewritten from the Hub checkpoint's format (same rendered prompt for
# user/assistant turns with text and image parts; tool/system extras left out).
LLAVA_CHAT = (  # [V] llava-hf/llava-1.5-7b-hf
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_CHAT = (  # [R] llava-hf/llava-v1.6-mistral-7b-hf ([INST] format, images first)
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> ' }}{% endif %}{% endfor %}"
)
ONEVISION_CHAT = (  # [V] llava-hf/llava-onevision-qwen2-0.5b-ov-hf
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_VL_CHAT = (  # [V] Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct chat_template.json
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN3_VL_CHAT = (  # [R] Qwen/Qwen3-VL-*-Instruct (ChatML, no default system prompt, same vision placeholders)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif content['type'] == 'video' %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IDEFICS3_CHAT = (  # [V] HuggingFaceM4/Idefics3-8B-Llama3 (renders the string the transformers test expects)
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GEMMA3_CHAT = (  # [R] google/gemma-3-4b-it (images as <start_of_image>)
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
    "{% endif %}"
)
INTERNVL_CHAT = (  # [R] OpenGVLab/InternVL3-1B-hf (ChatML, an image renders as <IMG_CONTEXT> + newline)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MLLAMA_CHAT = (  # [R] meta-llama/Llama-3.2-11B-Vision-Instruct (Llama 3 headers, <|image|> in place)
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL3_CHAT = (  # [R] mistralai/Mistral-Small-3.1-24B-Instruct-2503 ([INST] with [IMG] in place)
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST]' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{{ block['text'] }}{% elif block['type'] == 'image' %}{{ '[IMG]' }}{% endif %}"
    "{% endfor %}{% endif %}{{ '[/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

# --------------------------------------------------------------------------------------------------- VLM families


def _build_llava(out: Path, seed: int = 0) -> Path:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT (CLS + patches, feature layer -2, CLS dropped), MLP projector, Llama."""
    from transformers import CLIPImageProcessor

    tok = _llama2_tok(["<image>"], chat_template=None)
    ip = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = _processor("LlavaProcessor", image_processor=ip, tokenizer=tok, patch_size=8,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                      chat_template=LLAVA_CHAT)
    return _vlm("llava", tok, proc, out, seed, text_config=_text_sub("llama", tok), vision_config=_clip_vision(),
                image_token_index=_ids(tok, image="<image>")["image"], image_seq_length=4,
                vision_feature_layer=-2, vision_feature_select_strategy="default")


PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]


def _build_llava_next(out: Path, seed: int = 0) -> Path:
    """llava-hf/llava-v1.6-mistral-7b-hf: any-resolution tiles + base image, learned image_newline, Mistral."""
    from transformers import LlavaNextImageProcessor

    tok = _llama2_tok(["<image>"], chat_template=None)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                 image_grid_pinpoints=PINPOINTS)
    proc = _processor("LlavaNextProcessor", image_processor=ip, tokenizer=tok, patch_size=8,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                      chat_template=LLAVA_NEXT_CHAT)
    return _vlm("llava_next", tok, proc, out, seed, text_config=_text_sub("mistral", tok),
                vision_config=_clip_vision(), image_token_index=_ids(tok, image="<image>")["image"],
                image_grid_pinpoints=PINPOINTS, image_seq_length=4, vision_feature_layer=-2,
                vision_feature_select_strategy="default")


def _build_llava_onevision(out: Path, seed: int = 0) -> Path:
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP (last layer, all tokens), anyres_max_9, Qwen2."""
    from transformers import LlavaOnevisionImageProcessor

    tok = _qwen_tok(["<image>", "<video>"], chat_template=None)
    grid = [[16, 16], [16, 32], [32, 16], [32, 32]]
    ip = LlavaOnevisionImageProcessor(size={"height": 16, "width": 16}, image_grid_pinpoints=grid,
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = _processor("LlavaOnevisionProcessor", "LlavaOnevisionVideoProcessor", image_processor=ip, tokenizer=tok, num_image_tokens=4,
                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                      chat_template=ONEVISION_CHAT)
    ids = _ids(tok, image="<image>", video="<video>")
    return _vlm("llava_onevision", tok, proc, out, seed, text_config=_text_sub("qwen2", tok),
                vision_config=_siglip_vision(), image_token_index=ids["image"], video_token_index=ids["video"],
                image_grid_pinpoints=grid, vision_feature_layer=-1, vision_feature_select_strategy="full",
                vision_aspect_ratio="anyres_max_9")


def _qwen_vl(model_type: str, processor_cls: str, video_cls: str, chat: str, vision: dict, out: Path, seed: int,
             layers: int = 2, **rope) -> Path:
    """Shared shape of the Qwen VL families: Qwen2 tokenizer with the vision tokens, Qwen2VLImageProcessor with
    4 px patches merged 2x2 (min 8x8 px, max 32x32 px), M-RoPE text config (mrope_section [1, 1, 2] of head_dim 8)."""
    from transformers import Qwen2VLImageProcessor

    tok = _qwen_tok(QWEN_VISION_SPECIALS, chat_template=None)
    ip = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                               size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32})
    proc = _processor(processor_cls, video_cls, image_processor=ip, tokenizer=tok, chat_template=chat)
    text = _text_sub(f"{model_type}_text", tok, layers=layers,
                     rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], **rope})
    ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    return _vlm(model_type, tok, proc, out, seed, text_config=text, vision_config=vision, **ids)


def _build_qwen2_vl(out: Path, seed: int = 0) -> Path:
    """Qwen/Qwen2-VL-2B-Instruct: ViT with 2x2 patch merger, M-RoPE (mrope_section) on the text side."""
    vision = dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    return _qwen_vl("qwen2_vl", "Qwen2VLProcessor", "Qwen2VLVideoProcessor", QWEN2_VL_CHAT, vision, out, seed,
                    rope_theta=1e6)


def _build_qwen2_5_vl(out: Path, seed: int = 0) -> Path:
    """Qwen/Qwen2.5-VL-3B-Instruct: windowed ViT (full attention in fullatt_block_indexes), RMSNorm, SwiGLU."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
    return _qwen_vl("qwen2_5_vl", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", QWEN2_VL_CHAT, vision, out,
                    seed, rope_theta=1e6)


def _build_qwen3_vl(out: Path, seed: int = 0) -> Path:
    """Qwen/Qwen3-VL-2B-Instruct: DeepStack (vision features of deepstack_visual_indexes added to the hidden states
    after the first decoder layers), interleaved M-RoPE, learned position embedding interpolated to the grid."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    return _qwen_vl("qwen3_vl", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", QWEN3_VL_CHAT, vision, out, seed,
                    layers=3, rope_theta=5e6, mrope_interleaved=True)


IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _idefics_vision(kind: str) -> dict:
    return dict(model_type=kind, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=16, patch_size=4)


def _build_idefics3(out: Path, seed: int = 0) -> Path:
    """HuggingFaceM4/Idefics3-8B-Llama3: SigLIP-like encoder on 364px tiles (here 16px) + global image, pixel
    shuffle (scale_factor 2) connector, Llama 3."""
    from transformers import Idefics3ImageProcessor

    tok = _byte_level_backend(["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
                              + IDEFICS_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>",
                              pad_token="<|finetune_right_pad_id|>", add_bos_token=True)
    ip = Idefics3ImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    proc = _processor("Idefics3Processor", image_processor=ip, tokenizer=tok, image_seq_len=4,
                      chat_template=IDEFICS3_CHAT)
    return _vlm("idefics3", tok, proc, out, seed, text_config=_text_sub("llama", tok),
                vision_config=_idefics_vision("idefics3_vision"), scale_factor=2,
                image_token_id=_ids(tok, image="<image>")["image"])


def _build_smolvlm(out: Path, seed: int = 0) -> Path:
    """HuggingFaceTB/SmolVLM-256M-Instruct: Idefics3 architecture on SmolLM2 (GPT-2 BPE tokenizer)."""
    from transformers import SmolVLMImageProcessor
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    tok = _tokenizer("GPT2Tokenizer", "bytes", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>"]
                     + IDEFICS_SPECIALS, named=None, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                     eos_token="<end_of_utterance>", pad_token="<|im_end|>")
    ip = SmolVLMImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 16},
                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    with _num2words_for_images():
        proc = _processor("SmolVLMProcessor", "SmolVLMVideoProcessor", image_processor=ip, tokenizer=tok,
                          image_seq_len=4, chat_template=DEFAULT_CHAT_TEMPLATE)
    return _vlm("smolvlm", tok, proc, out, seed, text_config=_text_sub("llama", tok),
                vision_config=_idefics_vision("smolvlm_vision"), scale_factor=2,
                image_token_id=_ids(tok, image="<image>")["image"])


def _build_paligemma(out: Path, seed: int = 0) -> Path:
    """google/paligemma-3b-pt-224: SigLIP, linear projector, Gemma, prefix-LM (bidirectional attention over the
    image + prompt, token_type_ids).  The processor adds 1024 <locNNNN> + 128 <segNNN> tokens to the tokenizer, so
    this family's vocabulary is ~1300 (they are real tokens of the 257k PaliGemma vocabulary)."""
    from transformers import SiglipImageProcessor

    tok = _gemma_tok(["<image>"], chat_template=None)
    ip = SiglipImageProcessor(size={"height": 16, "width": 16}, image_seq_length=4)
    proc = _processor("PaliGemmaProcessor", image_processor=ip, tokenizer=tok)
    text = _text_sub("gemma", tok)
    return _vlm("paligemma", tok, proc, out, seed, text_config=text, vision_config=_siglip_vision(),
                image_token_index=_ids(tok, image="<image>")["image"], vocab_size=text["vocab_size"],
                projection_dim=32, hidden_size=32)


def _build_gemma3(out: Path, seed: int = 0) -> Path:
    """google/gemma-3-4b-it: SigLIP, average-pooled to mm_tokens_per_image, Gemma 3 text with sliding/full layers
    and bidirectional attention inside each image (token_type_ids)."""
    from transformers import Gemma3ImageProcessor

    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tok = _gemma_tok(list(named.values()), named=named, chat_template=None)
    ip = Gemma3ImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = _processor("Gemma3Processor", image_processor=ip, tokenizer=tok, image_seq_length=4,
                      chat_template=GEMMA3_CHAT)
    text = _text_sub("gemma3_text", tok, layers=3, sliding_window=SLIDING, query_pre_attn_scalar=8,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    ids = _ids(tok, image=named["image_token"], boi=named["boi_token"], eoi=named["eoi_token"])
    return _vlm("gemma3", tok, proc, out, seed, text_config=text, vision_config=_siglip_vision(16, 4),
                mm_tokens_per_image=4, image_token_index=ids["image"], boi_token_index=ids["boi"],
                eoi_token_index=ids["eoi"])


def _build_internvl(out: Path, seed: int = 0) -> Path:
    """OpenGVLab/InternVL3-1B-hf: InternViT, pixel shuffle (downsample_ratio 0.5) + MLP, Qwen2; dynamic tiles."""
    from transformers import GotOcr2ImageProcessor

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _qwen_tok(list(named.values()), named=named, chat_template=None)
    ip = GotOcr2ImageProcessor(size={"height": 16, "width": 16}, crop_to_patches=True, max_patches=4,
                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    proc = _processor("InternVLProcessor", "InternVLVideoProcessor", image_processor=ip, tokenizer=tok, image_seq_length=4,
                      chat_template=INTERNVL_CHAT)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=[16, 16], patch_size=[4, 4])
    return _vlm("internvl", tok, proc, out, seed, text_config=_text_sub("qwen2", tok), vision_config=vision,
                image_token_id=_ids(tok, image=named["context_image_token"])["image"], image_seq_length=4,
                downsample_ratio=0.5, vision_feature_layer=-1)


def _build_mllama(out: Path, seed: int = 0) -> Path:
    """meta-llama/Llama-3.2-11B-Vision-Instruct: tiled ViT (local + global layers, aspect-ratio embeddings),
    text decoder with gated cross-attention layers (cross_attention_layers) between self-attention layers."""
    from transformers import MllamaImageProcessor

    tok = _byte_level_backend(["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                               "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>",
                               "<|image|>"], bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                              pad_token="<|finetune_right_pad_id|>", add_bos_token=True)
    tok.chat_template = None
    ip = MllamaImageProcessor(size={"height": 16, "width": 16}, max_image_tiles=2)
    proc = _processor("MllamaProcessor", image_processor=ip, tokenizer=tok, chat_template=MLLAMA_CHAT)
    text = _text_sub("mllama_text_model", tok, layers=3, cross_attention_layers=[1])
    text.pop("head_dim", None)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  intermediate_size=64, vision_output_dim=64, image_size=16, patch_size=8, max_num_tiles=2,
                  intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    return _vlm("mllama", tok, proc, out, seed, text_config=text, vision_config=vision,
                image_token_index=_ids(tok, image="<|image|>")["image"])



def _build_mistral3(out: Path, seed: int = 0) -> Path:
    """mistralai/Mistral-Small-3.1-24B-Instruct-2503: Pixtral ViT (2-D RoPE, any aspect ratio), 2x2 patch merger,
    [IMG]/[IMG_BREAK]/[IMG_END] tokens, Mistral text; lm_head not tied."""
    from transformers import PixtralImageProcessor

    tok = _byte_level_backend(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                               "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>", add_bos_token=True)
    ip = PixtralImageProcessor(size={"longest_edge": 32}, patch_size={"height": 8, "width": 8})
    tok.chat_template = MISTRAL3_CHAT
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                  image_size=32, patch_size=8)
    out = _vlm("mistral3", tok, None, out, seed, text_config=_text_sub("mistral", tok, tie_word_embeddings=False),
               vision_config=vision, image_token_index=_ids(tok, image="[IMG]")["image"], spatial_merge_size=2,
               tie_word_embeddings=False)
    # PixtralProcessor cannot be imported without torchvision (its module imports torchvision), so the processor is
    # written in the Hub's own layout for this checkpoint: preprocessor_config.json (the image processor),
    # processor_config.json (PixtralProcessor's init arguments), chat template with the tokenizer.
    ip.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "PixtralProcessor", "patch_size": 8, "spatial_merge_size": 2, "image_token": "[IMG]",
         "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}, indent=2, sort_keys=True) + "\n")
    return out


# --------------------------------------------------------------------------------------------------- NVILA
# No transformers class exists for NVILA (docs/NVILA.md).  Both Hub layouts are built from the same
# parts, so for one seed the VILA folder and the flat -hf folder hold identical LLM / vision / projector tensors.
# Facts follow docs/NVILA.md ([V] seen in the public source named there, [I] inferred from it).

NVILA_IMAGE = 32        # SigLIP input side (NVILA: 448); patch 4 -> 8x8 patches, like 448/14 = 32x32
NVILA_PATCH = 4
NVILA_MM = 16           # mm_hidden_size = SigLIP width (NVILA-Lite: 1152) [V sglang defaults]
NVILA_SPECIALS = ["[BOS]", "[PAD]"]                            # added by VILA training [V §1.1 llm/]
NVILA_MEDIA = ["<vila/sentinel>", "<image>", "<vila/video>"]   # added at load, in this order [V §2.4]


def _nvila_projector(mm: int, h: int):
    """``mlp_downsample_3x3_fix`` [V §2.1, VILA base_projector.py L163-174]: Sequential of
    0 DownSample3x3BlockFix (no parameters) · 1 LayerNorm(9mm) · 2 Linear(9mm->3mm) · 3 GELU · 4 LayerNorm(3mm) ·
    5 Linear(3mm->h) · 6 GELU · 7 Linear(h->h); LayerNorm eps 1e-5 and exact GELU [I, from the constructor calls].
    Index 0 is an Identity here: the downsampling has no weights, only the state-dict indices matter.  Held as
    ``layers`` like VILA's ``MultimodalProjector.layers``, so the state dict reads ``layers.N.{weight,bias}``."""
    from torch import nn

    return nn.ModuleDict({"layers": nn.Sequential(
        nn.Identity(), nn.LayerNorm(9 * mm), nn.Linear(9 * mm, 3 * mm), nn.GELU(), nn.LayerNorm(3 * mm),
        nn.Linear(3 * mm, h), nn.GELU(), nn.Linear(h, h))})


def _nvila_parts(seed: int):
    """(tokenizer, Qwen2 config, Qwen2ForCausalLM, SigLIP vision config, SiglipVisionModel, projector, image
    processor) of a tiny NVILA-Lite, random weights from ``torch.manual_seed(seed)``."""
    from transformers import Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    tok = _qwen_tok(NVILA_SPECIALS, chat_template=None)
    tok.bos_token, tok.pad_token = "[BOS]", "[PAD]"  # [I §3.1: the probe starts from bos "[BOS]"]
    llm_cfg = _text_cfg("qwen2", tok, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=None,
                        tie_word_embeddings=False, vocab_size=len(tok))  # NVILA-8B: vocab = len(tok), untied [V]
    llm_cfg.architectures = ["Qwen2ForCausalLM"]
    # 3 encoder layers: with mm_vision_select_layer -2 the last one never reaches the LLM (as layer 26 of 27)
    vis_cfg = SiglipVisionConfig(hidden_size=NVILA_MM, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, image_size=NVILA_IMAGE, patch_size=NVILA_PATCH,
                                 hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
    vis_cfg.architectures = ["SiglipVisionModel"]
    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(llm_cfg).eval()
    tower = SiglipVisionModel(vis_cfg).eval()
    projector = _nvila_projector(NVILA_MM, llm_cfg.hidden_size).eval()
    for module in (llm, tower, projector):
        _fill_zero_init(module)
    # SigLIP processor of vision_tower/: mean = std = 0.5, rescale 1/255, bicubic, square size [V]
    ip = SiglipImageProcessor(size={"height": NVILA_IMAGE, "width": NVILA_IMAGE}, resample=3,
                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return tok, llm_cfg, llm, vis_cfg, tower, projector, ip


def _save_safetensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _build_nvila_folder(out: Path, seed: int = 0) -> Path:
    """The original VILA layout (NVILA-8B, NVILA-Lite-2B/8B/15B) [V §1.1]: root config.json (model_type
    "llava_llama", llm_cfg / vision_tower_cfg / mm_projector_cfg), llm/ (a plain Qwen2 checkpoint + tokenizer,
    written by LlavaMetaModel.save_pretrained), vision_tower/ (SiglipVisionModel + preprocessor_config.json),
    mm_projector/ (config.json + model.safetensors with layers.{1,2,4,5,7}.{weight,bias}) and trainer_state.json."""
    tok, llm_cfg, llm, vis_cfg, tower, projector, ip = _nvila_parts(seed)
    out = Path(out)
    llm.generation_config = _generation_config(llm_cfg, tok)
    llm.save_pretrained(out / "llm")
    tok.save_pretrained(out / "llm")
    tower.save_pretrained(out / "vision_tower")
    ip.save_pretrained(out / "vision_tower")
    (out / "mm_projector").mkdir(parents=True)
    projector_cfg = {"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample_3x3_fix",
                     "model_type": "v2l_projector", "torch_dtype": "float32"}  # [V NVILA-Lite-15B-Video]
    (out / "mm_projector" / "config.json").write_text(json.dumps(projector_cfg, indent=2) + "\n")
    _save_safetensors(projector.state_dict(), out / "mm_projector" / "model.safetensors")  # layers.N.* [I]
    llm_dict = {**llm_cfg.to_dict(), "model_max_length": 256, "tokenizer_model_max_length": 256,
                "tokenizer_padding_side": "right"}  # extra keys of NVILA-8B's llm_cfg [V]
    root = {  # NVILA-8B root config [V], with NVILA-Lite's projector and "dynamic" tiling [I]
        "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "model_dtype": "torch.float32",
        "hidden_size": llm_cfg.hidden_size, "mm_hidden_size": NVILA_MM,
        "image_aspect_ratio": "dynamic", "dynamic_s2": False, "s2": False, "min_tiles": 1, "max_tiles": 12,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": True, "num_video_frames": 8, "fps": 0.0, "num_time_tokens": 0,
        "chat_template": None, "llm_cfg": llm_dict, "vision_tower_cfg": vis_cfg.to_dict(),
        "mm_projector_cfg": projector_cfg, "transformers_version": "4.46.0",
    }
    (out / "config.json").write_text(json.dumps(root, indent=2) + "\n")
    trainer_state = {"best_metric": None, "best_model_checkpoint": None, "epoch": 1.0, "global_step": 1,
                     "is_hyper_param_search": False, "is_local_process_zero": True, "is_world_process_zero": True,
                     "log_history": [], "logging_steps": 1, "max_steps": 1, "num_train_epochs": 1,
                     "save_steps": 1, "total_flos": 0.0, "train_batch_size": 1, "trial_name": None,
                     "trial_params": None}  # a Hugging Face Trainer state [I: content not documented]
    (out / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    return out


def _build_nvila_hf(out: Path, seed: int = 0) -> Path:
    """The flat custom-code ``-hf`` layout (NVILA-Lite-2B-hf) [§1.3]: config.json with model_type "nvila_lite",
    text_config (Qwen2) and vision_config (SigLIP) [V sglang config classes], image/video token ids [V]; one
    model.safetensors with llm.model.*, llm.lm_head.weight, vision_tower.vision_model.*, mm_projector.layers.N.*
    [I sglang load_weights]; tokenizer with the media tokens; SigLIP preprocessor_config.json [V];
    processor_config.json naming the remote NVILALiteProcessor [V].  The remote code files are not written: the
    tool must work without them."""
    tok, llm_cfg, llm, vis_cfg, tower, projector, ip = _nvila_parts(seed)
    tok.add_special_tokens({"extra_special_tokens": NVILA_MEDIA}, replace_extra_special_tokens=False)
    out = Path(out)
    out.mkdir(parents=True)
    tensors = {f"llm.{k}": v for k, v in llm.state_dict().items()}
    tensors.update({f"vision_tower.{k}": v for k, v in tower.state_dict().items()})
    tensors.update({f"mm_projector.{k}": v for k, v in projector.state_dict().items()})
    _save_safetensors(tensors, out / "model.safetensors")
    ids = _ids(tok, image="<image>", video="<vila/video>")
    config = {
        "architectures": ["NVILALiteForConditionalGeneration"], "model_type": "nvila_lite",  # class name [I]
        "auto_map": {"AutoConfig": "configuration_nvila_lite.NVILALiteConfig",
                     "AutoModel": "modeling_nvila_lite.NVILALiteForConditionalGeneration",
                     "AutoProcessor": "processing_nvila_lite.NVILALiteProcessor"},  # custom_code tag [V], names [I]
        "text_config": llm_cfg.to_dict(), "vision_config": vis_cfg.to_dict(),
        "image_token_id": ids["image"], "video_token_id": ids["video"],
        "mm_projector_type": "mlp_downsample_3x3_fix", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch", "torch_dtype": "float32", "transformers_version": "4.56.0",
    }  # no mm_hidden_size: NVILA-8B-hf's config has none [V PR #10399]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _generation_config(llm_cfg, tok).save_pretrained(out)
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(
        {"auto_map": {"AutoProcessor": "processing_nvila_lite.NVILALiteProcessor"},
         "processor_class": "NVILALiteProcessor"}) + "\n")
    return out


# --------------------------------------------------------------------------------------------------- Ovis2, Qwen3-VL-MoE

OVIS2_CHAT = (  # [R] AIDC-AI/Ovis2-1B-hf (ChatML; an image is "<image>\n" before the text)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<image>\n' }}{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
OVIS_SPECIALS = ["<image>", "<IMG_START>", "<IMG_ATOM>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]


def _build_ovis2(out: Path, seed: int = 0) -> Path:
    """AIDC-AI/Ovis2-1B-hf: AIMv2-like ViT, hidden_stride 2 (4 tokens per 16 px image), a visual-vocabulary
    embedding table (image features are soft tokens over it), visual indicator tokens
    <IMG_START>/<IMG_GRID>/<IMG_COL>/<IMG_ROW>/<IMG_END> with their own embeddings, Qwen2."""
    from transformers import Ovis2ImageProcessorPil

    tok = _qwen_tok(OVIS_SPECIALS, chat_template=OVIS2_CHAT)
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


def _build_qwen3_vl_moe(out: Path, seed: int = 0) -> Path:
    """Qwen/Qwen3-VL-30B-A3B-Instruct: Qwen3-VL (DeepStack) with MoE text layers whose experts are stored as
    3-D tensors (experts, in, out); transformers loads them through a converter that transposes them."""
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



# --------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Family:
    """One model family of the test matrix.

    ``name``: the key in FAMILIES (transformers model_type, or nvila_folder / nvila_hf); ``kind``: "text",
    "vlm", "seq2seq" (an encoder-decoder, loaded with AutoModelForImageTextToText) or "reward" (BASE a causal LM,
    the fine-tune a sequence classifier); ``build(out, seed=0) -> out``: writes the checkpoint folder ``out`` (must not exist, or be empty);
    ``notes``: what the family exercises; ``image_size``: side (px) of the noise images it is sized for (VLMs);
    ``fine_tune(base, out) -> out``: writes the fine-tune the matrix repairs, from the BASE folder ``base`` (None: the
    family built with seed 1)."""

    name: str
    kind: str
    build: Callable[..., Path]
    notes: str
    image_size: int = NOISE_SIZE
    fine_tune: Callable[..., Path] | None = None


def _family(name: str, kind: str, notes: str, image_size: int = NOISE_SIZE, build_as: str = "",
            fine_tune: Callable[..., Path] | None = None) -> Family:
    return Family(name, kind, globals()[f"_build_{build_as or name}"], notes, image_size, fine_tune)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    _family("llama", "text", "baseline dense decoder, untied, LlamaTokenizer (SentencePiece-style BPE)"),
    _family("mistral", "text", f"sliding_window={SLIDING} on every layer (no layer_types); tokenizer loads as "
                               "TokenizersBackend"),
    _family("qwen2", "text", f"use_sliding_window, max_window_layers=1 -> layer_types full, sliding, sliding "
                             f"(window {SLIDING}); q/k/v biases"),
    _family("qwen3", "text", f"layer_types full, sliding, full (window {SLIDING}); q_norm/k_norm"),
    _family("gemma2", "text", f"alternating sliding/full (window {SLIDING}), attention + final logit soft-capping, "
                              "4 norms per layer, tied, embeddings scaled by sqrt(hidden)"),
    _family("gemma3_text", "text", f"layer_types sliding, full, sliding (window {SLIDING}); local rope theta 1e4 "
                                   "vs global 1e6 (rope_parameters per layer type); tied"),
    _family("phi3", "text", "fused self_attn.qkv_proj and mlp.gate_up_proj"),
    _family("gpt2", "text", "transformers Conv1D (weight stored [in, out]) c_attn/c_proj/c_fc with biases; "
                            "transformer.h.N naming; learned positions; tied"),
    _family("qwen3_moe", "text", "layer 0 dense (mlp_only_layers), layers 1-2 sparse MoE: 4 experts top-2, "
                                 "saved per expert (mlp.experts.N.{gate,up,down}_proj), router mlp.gate; in memory "
                                 "transformers fuses experts into 3-D gate_up_proj/down_proj"),
    _family("mixtral", "text", "every layer MoE (4 experts top-2), saved per expert with the legacy names "
                               "block_sparse_moe.experts.N.w1/w2/w3 and block_sparse_moe.gate"),
    _family("lfm2", "text", "layer 0 short convolution (conv.in_proj, depthwise conv.conv kernel, conv.out_proj), "
                            "layer 1 attention; feed_forward.w1/w2/w3; tied"),
    _family("jamba", "text", "layer 0 Mamba mixer (in_proj, x_proj, dt_proj, out_proj; conv1d kernel, A_log, D) + MLP, "
                             "layer 1 attention + MoE (feed_forward.router module, 4 experts saved per expert)"),
    _family("qwen3_next", "text", "layer 0 gated DeltaNet linear attention (in_proj_qkvz, in_proj_ba, out_proj; "
                                  "conv1d kernel, A_log, dt_bias), layer 1 gated attention; MoE with shared expert "
                                  "and shared_expert_gate in every layer"),
    _family("granitemoehybrid", "text", "layer 0 Mamba2 mixer, layer 1 attention; MoE experts stored fused on disk "
                                        "(scored per expert), router module, shared MLP; config.json as "
                                        "save_pretrained writes it: time_step_limit [0.0, {\"__float__\": "
                                        "\"Infinity\"}]"),
    _family("gpt_oss", "text", "experts stored fused on disk, (experts, in, out) per expert, gate/up interleaved, "
                               "with biases; scored per expert; router module; attention sinks"),
    _family("llama4_text", "text", "layer 0 dense, layer 1 MoE: experts in 3-D tensors multiplied by one torch.bmm "
                                   "over all experts (layout traced), scored per expert; router; shared expert; NoPE"),
    _family("gemma3n_text", "text", "4 layers, the last 2 reuse the K/V of layers 0 and 1 (shared across layers); "
                                    "per-layer inputs, AltUp, LAuReL"),
    _family("qwen2_reward", "reward", "a Qwen2ForSequenceClassification reward model (a score head, no lm_head) "
                                      "fine-tuned from the qwen2 BASE", build_as="qwen2", fine_tune=build_qwen2_reward),
    _family("florence2", "seq2seq", "encoder-decoder: DaViT vision tower + BART (1 encoder layer, 2 decoder layers "
                                    "with cross-attention); the decoder stack is scored, the encoder listed; tied"),
    _family("llava", "vlm", "CLIP tower, feature layer -2 (last CLIP layer unused), CLS dropped, 2-layer MLP "
                            "projector; <image> expands to 4 tokens; forward needs nothing beyond the processor"),
    _family("llava_next", "vlm", "any-resolution tiles (image_grid_pinpoints) + base image, image_newline "
                                 "parameter; forward needs image_sizes (from the processor)"),
    _family("llava_onevision", "vlm", "SigLIP tower (all tokens, last layer), anyres_max_9; image_sizes + "
                                      "batch_num_images; processor has a video slot (torchvision)"),
    _family("qwen2_vl", "vlm", "ViT with 2x2 PatchMerger, pixel_values flattened to patches [N, C*T*P*P], "
                               "image_grid_thw, 3-D M-RoPE positions from input_ids; video slot (torchvision)"),
    _family("qwen2_5_vl", "vlm", "windowed vision attention (window 16 px, full attention in block 1), RMSNorm + "
                                 "SwiGLU vision MLP; video slot (torchvision)", image_size=32),
    _family("qwen3_vl", "vlm", "DeepStack: vision features from blocks 0,1 are added to the LLM hidden states after "
                               "decoder layers 0 and 1 (3 layers); interleaved M-RoPE; video slot (torchvision)"),
    _family("idefics3", "vlm", "image split into 2x2 tiles + global image (5 x 4 tokens), pixel shuffle "
                               "connector, pixel_attention_mask; Llama-3 style byte-level tokenizer"),
    _family("smolvlm", "vlm", "Idefics3 architecture on a GPT-2 BPE tokenizer; processor needs num2words and "
                              "torchvision (video slot) in transformers 5.24"),
    _family("paligemma", "vlm", "prefix-LM: token_type_ids (image+prefix bidirectional); processor adds <bos> "
                                "after the image tokens and a trailing newline, and 1152 <loc>/<seg> tokens to the "
                                "vocabulary; tied"),
    _family("gemma3", "vlm", f"text layers sliding, full, sliding (window {SLIDING}); SigLIP pooled to 4 tokens; "
                             "<start_of_image> expands to boi + 4 <image_soft_token> + eoi; token_type_ids; tied"),
    _family("internvl", "vlm", "InternViT (layer scale), pixel shuffle downsample 0.5 + MLP; <IMG_CONTEXT> "
                               "expands to <img> + 4 x <IMG_CONTEXT> + </img>; tied; video slot (torchvision)"),
    _family("mllama", "vlm", "cross-attention decoder layer 1 between self-attention layers 0 and 2; the image "
                             "is one <|image|> token, features enter through cross_attention_states; "
                             "cross_attention_mask, aspect_ratio_ids/mask; tiled ViT with global layers"),
    _family("mistral3", "vlm", "Pixtral tower (2-D RoPE, image_sizes), 2x2 patch merger; [IMG] x cols + "
                               "[IMG_BREAK] per row, last [IMG_END]; PixtralProcessor needs torchvision, so the "
                               "processor is written as Hub files only", image_size=32),
    _family("ovis2", "vlm", "AIMv2-like ViT, visual-vocabulary embedding (image features are soft tokens over it), "
                            "visual indicator tokens with their own embeddings; Qwen2"),
    _family("nvila_folder", "vlm", "VILA layout: root config + llm/ (Qwen2) + vision_tower/ (SigLIP) + "
                                   "mm_projector/ (mlp_downsample_3x3_fix); no transformers class",
            image_size=NVILA_IMAGE),
    _family("nvila_hf", "vlm", "flat -hf layout: one safetensors with llm./vision_tower./mm_projector. prefixes; "
                               "model_type nvila_lite; no transformers class", image_size=NVILA_IMAGE),
]}


# checkpoints of families tested in their own files, not in the matrix (tests/test_expert_stacks.py)
OWN_TESTS: dict[str, Callable[..., Path]] = {"qwen3_vl_moe": _build_qwen3_vl_moe,
                                             "qwen3_vl_moe_hub": _build_qwen3_vl_moe_hub}


def build(name: str, out: Path, seed: int = 0) -> Path:
    """Build family ``name`` (of FAMILIES or OWN_TESTS) into the folder ``out`` with weights from
    ``torch.manual_seed(seed)``; returns ``out``.

    Raises KeyError for an unknown name."""
    return (FAMILIES[name].build if name in FAMILIES else OWN_TESTS[name])(Path(out), seed)


def build_fine_tune(name: str, base: Path, out: Path) -> Path:
    """The fine-tune of family ``name`` the matrix repairs: ``Family.fine_tune(base, out)``, or the family built
    with seed 1 into ``out``."""
    f = FAMILIES[name]
    return f.fine_tune(Path(base), Path(out)) if f.fine_tune else f.build(Path(out), 1)
