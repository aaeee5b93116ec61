"""Data-free probes (METHOD.md, "Data-free probes").

Text: BOS, then 1 to 5 tokens drawn uniformly from the vocabulary (special
tokens replaced by BOS), then the model continues by sampling (temperature 0.9,
top-p 0.9, repetition penalty 1.05) up to the probe length. All sequences are
generated together, one token per step through the streamed layers with a
per-layer KV cache; rows still inside their random prefix are fed the prefix
token instead of a sample, so no padding is needed.

Images (optional): Gaussian noise N(0.5, 0.25^2) per channel, normalised with
the processor's mean/std, at the vision tower's resolution, with the model's
image placeholder tokens in front of the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DowserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.9
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    prefix_min: int = 1
    prefix_max: int = 5


def special_token_ids(ckpt, text_cfg: dict, config: dict) -> tuple[int, set[int]]:
    """(BOS id, special ids) from the config and tokenizer files, without building a tokenizer."""
    special: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for cfg in (text_cfg, config):
            v = cfg.get(key)
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, int):
                    special.add(x)
    for key in ("image_token_index", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if isinstance(config.get(key), int):
            special.add(config[key])
    for fname, field in (("tokenizer_config.json", "added_tokens_decoder"), ("tokenizer.json", "added_tokens")):
        if fname in ckpt.files():
            try:
                doc = json.loads(ckpt.read_text(fname))
            except (json.JSONDecodeError, TypeError):
                continue
            entries = doc.get(field) or {}
            items = entries.items() if isinstance(entries, dict) else [(e.get("id"), e) for e in entries]
            for tid, tok in items:
                if isinstance(tok, dict) and tok.get("special"):
                    special.add(int(tid))
    bos = text_cfg.get("bos_token_id", config.get("bos_token_id"))
    if not isinstance(bos, int):
        eos = text_cfg.get("eos_token_id", config.get("eos_token_id"))
        bos = eos[0] if isinstance(eos, list) else eos
    if not isinstance(bos, int):
        raise DowserError(f"{ckpt.where}: config has neither bos_token_id nor eos_token_id to start probes with")
    return bos, special


def random_prefixes(count: int, vocab: int, bos: int, special: set[int], sampling: Sampling, gen: torch.Generator):
    """Per row: BOS + 1..5 uniform tokens (specials replaced by BOS)."""
    rows = []
    for _ in range(count):
        n = int(torch.randint(sampling.prefix_min, sampling.prefix_max + 1, (1,), generator=gen))
        toks = torch.randint(0, vocab, (n,), generator=gen).tolist()
        rows.append([bos] + [bos if t in special else t for t in toks])
    return rows


def sample_next(logits: torch.Tensor, history: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> torch.Tensor:
    """One sampled token per row with transformers' own logits processors (as `generate` does)."""
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    scores = logits.detach().float().cpu()
    for proc in (
        RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty),
        TemperatureLogitsWarper(sampling.temperature),
        TopPLogitsWarper(sampling.top_p),
    ):
        scores = proc(history, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


@torch.no_grad()
def generate_text_probes(runner, count: int, length: int, seed: int, sampling: Sampling = Sampling(),
                         progress=None) -> torch.Tensor:
    """(count, length) token ids: random prefixes continued by the model, streamed layer by layer."""
    from transformers import DynamicCache

    from .names import text_config

    config = runner.ckpt.config
    text_cfg = text_config(config, runner.arch)
    vocab = int(text_cfg.get("vocab_size") or config.get("vocab_size"))
    bos, special = special_token_ids(runner.ckpt, text_cfg, config)
    gen = torch.Generator().manual_seed(seed)
    prefixes = random_prefixes(count, vocab, bos, special, sampling, gen)
    tokens = torch.full((count, length), bos, dtype=torch.long)
    for r, p in enumerate(prefixes):
        tokens[r, : min(len(p), length)] = torch.tensor(p[:length])
    cache = DynamicCache(config=runner.model.config.get_text_config())
    for t in range(length - 1):
        step = runner.capture(input_ids=tokens[:, t : t + 1].to(runner.device), cache=cache, use_cache=True)
        h = step.hidden
        for _, layer in runner.stream(range(len(runner.layers))):
            h = step.call(layer, h)
        sampled = sample_next(runner.head_logits(h), tokens[:, : t + 1], sampling, gen)
        for r, p in enumerate(prefixes):
            if t + 1 >= len(p):  # past its prefix: the model's own continuation
                tokens[r, t + 1] = sampled[r]
        if progress is not None:
            progress.update(1)
    return tokens


def load_probe_file(path: str | Path) -> torch.Tensor:
    """Token ids from JSONL (one list per line) or a safetensors file (`probe/token_ids` or its only tensor)."""
    path = Path(path)
    if not path.is_file():
        raise DowserError(f"{path}: no such probe file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        from .safetensors_format import read_header

        header = read_header(path)
        keys = [k for k in header.tensors if k in ("probe/token_ids", "token_ids")] or list(header.tensors)
        if len(keys) != 1 and "probe/token_ids" not in keys:
            raise DowserError(f"{path}: expected one tensor of token ids, found {len(keys)}")
        with safe_open(str(path), framework="pt") as f:
            ids = f.get_tensor(keys[0])
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise DowserError(f"{path}: token ids must be a 2-D integer tensor, got {ids.dtype}{list(ids.shape)}")
        return ids.long()
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DowserError(f"{path}:{n}: not JSON") from None
        if not isinstance(row, list) or not row or not all(isinstance(x, int) and x >= 0 for x in row):
            raise DowserError(f"{path}:{n}: expected a non-empty list of token ids")
        rows.append(row)
    if not rows:
        raise DowserError(f"{path}: no probe sequences")
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise DowserError(
            f"{path}: sequences must all have the same length (got {min(lengths)} to {max(lengths)}); pad or cut them"
        )
    return torch.tensor(rows, dtype=torch.long)


def image_probe(ckpt, config: dict, count: int, seed: int) -> tuple[torch.Tensor, int, int]:
    """(pixel values (count, 3, H, W), image token id, tokens per image) for noise images."""
    vision = config.get("vision_config") or {}
    size = vision.get("image_size")
    patch = vision.get("patch_size")
    token = config.get("image_token_index", config.get("image_token_id"))
    if not (size and patch and isinstance(token, int)):
        raise DowserError(f"{ckpt.where}: --images needs a LLaVA-style vision_config (image_size, patch_size, image token)")
    mean, std = CLIP_MEAN, CLIP_STD
    if "preprocessor_config.json" in ckpt.files():
        pre = json.loads(ckpt.read_text("preprocessor_config.json"))
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    gen = torch.Generator().manual_seed(seed + 1)
    raw = torch.randn(count, 3, size, size, generator=gen) * 0.25 + 0.5
    pixels = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    n_tokens = (size // patch) ** 2 + (1 if config.get("vision_feature_select_strategy") == "full" else 0)
    return pixels, token, n_tokens
