"""Data-free probes (docs/METHOD.md, "The probes").

Text: BOS, then 1 to 5 tokens drawn uniformly from the vocabulary (special
tokens replaced by BOS), then the model continues by sampling (temperature 0.9,
top-p 0.9, repetition penalty 1.05) up to the probe length. All sequences are
generated together, one token per step through the streamed layers with a
per-layer KV cache; rows still inside their random prefix are fed the prefix
token instead of a sample, so no padding is needed. Media placeholder tokens (image, video,
audio, their markers) are never drawn nor sampled: the processor inserts them itself.

Encoder-decoder models (Florence-2's BART): the probe text is the encoder's input, and the
decoder's input is the same text shifted right behind the decoder start token (as transformers
trains them: `shift_tokens_right`), so the decoder runs over the probe's length. Generation has
no KV cache there: each step is a full forward, encoder input the prefix so far, decoder input
the start token and that prefix, and the next token is sampled from the decoder's last position.

Images (optional): Gaussian noise N(0.5, 0.25^2) per channel, normalised with
the processor's mean/std, at the vision tower's resolution, with the model's
image placeholder tokens in front of the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DowserError, reason


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.9
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    prefix_min: int = 1
    prefix_max: int = 5


def _tokenizer_files(ckpt):
    """(file name, parsed JSON, [(id, added-token entry)]) for each tokenizer file of the checkpoint
    (tokenizer_config.json's `added_tokens_decoder`, tokenizer.json's `added_tokens`), in every
    component folder; unreadable files are skipped."""
    files = set(ckpt.files())
    for folder in [""] + [f"{c}/" for c in ckpt.components()]:
        for fname, field in (("tokenizer_config.json", "added_tokens_decoder"), ("tokenizer.json", "added_tokens")):
            if folder + fname not in files:
                continue
            try:
                doc = json.loads(ckpt.read_text(folder + fname))
            except (json.JSONDecodeError, TypeError):
                continue
            entries = doc.get(field) or {}
            yield fname, doc, (entries.items() if isinstance(entries, dict) else [(e.get("id"), e) for e in entries])


def special_token_ids(ckpt, text_cfg: dict, config: dict) -> tuple[int, set[int]]:
    """(BOS id, special ids) from the config and tokenizer files, without building a tokenizer.

    BOS is the tokenizer's `bos_token` when it names one (the released scripts start probes with
    `tokenizer.bos_token_id`; NVILA's is `[BOS]`), else the config's `bos_token_id`, else its EOS.
    Tokenizer files are read at the root and in sub-model folders (NVILA's llm/).
    """
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
    ids: dict[str, int] = {}  # token text -> id, from the tokenizer files
    tok_bos = None
    for fname, doc, items in _tokenizer_files(ckpt):
        for tid, tok in items:
            if isinstance(tok, dict) and isinstance(tok.get("content"), str):
                ids.setdefault(tok["content"], int(tid))
            if isinstance(tok, dict) and tok.get("special"):
                special.add(int(tid))
        vocab = (doc.get("model") or {}).get("vocab") if fname == "tokenizer.json" else None
        if isinstance(vocab, dict):
            for text, tid in vocab.items():
                ids.setdefault(text, tid)
        if fname == "tokenizer_config.json" and tok_bos is None:
            b = doc.get("bos_token")
            tok_bos = b.get("content") if isinstance(b, dict) else b
    bos = ids.get(tok_bos) if isinstance(tok_bos, str) else None
    if not isinstance(bos, int):
        bos = text_cfg.get("bos_token_id", config.get("bos_token_id"))
    if not isinstance(bos, int):
        eos = text_cfg.get("eos_token_id", config.get("eos_token_id"))
        bos = eos[0] if isinstance(eos, list) else eos
    if not isinstance(bos, int):
        raise DowserError(f"{ckpt.where}: config has neither bos_token_id nor eos_token_id to start probes with; "
                          "set bos_token_id in config.json, or pass --probe-file")
    special.add(bos)
    return bos, special


# Added tokens that stand for media the processor inserts itself (image/video/audio placeholders, tile and
# frame markers): never part of a text probe.
_PLACEHOLDER_TEXT = re.compile(r"image|video|audio|img|vision|visual|patch|frame|media|row_\d+_col_\d+", re.I)
_ROLE_IDS = re.compile(r"(^|_)(bos|eos|pad|unk|sep|mask|cls|decoder_start)_token_")  # text roles, incl. forced_bos_...


def _config_token_ids(cfg) -> set[int]:
    """Every `..._token_id(s)` / `..._token_index` of a config dict and its sub-configs, except the text
    roles (BOS, EOS, padding, ...): the model's media placeholders and markers."""
    out: set[int] = set()
    if not isinstance(cfg, dict):
        return out
    for key, value in cfg.items():
        if isinstance(value, dict):
            out |= _config_token_ids(value)
        elif not _ROLE_IDS.search(key) and re.search(r"token_(id|ids|index)$", key):
            out |= {v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)}
    return out


def placeholder_token_ids(ckpt, config: dict) -> set[int]:
    """Ids of the tokens a text probe must never hold: the media placeholders and markers the config
    names (image/video/audio token ids, Ovis2's visual indicators, Gemma 3's boi/eoi, ...), the tokenizer's
    named media tokens (`extra_special_tokens` such as `image_token`), and added tokens whose text names
    a medium (`<image>`, `<|vision_pad|>`, `<IMG_ATOM>`, `<row_1_col_1>`). The processor inserts those
    itself; a sampled one makes the model's image-token count disagree with its features."""
    out = _config_token_ids(config)
    for fname, doc, items in _tokenizer_files(ckpt):
        texts = {tok["content"]: int(tid) for tid, tok in items
                 if isinstance(tok, dict) and isinstance(tok.get("content"), str)}
        out |= {tid for text, tid in texts.items() if _PLACEHOLDER_TEXT.search(text)}
        named = doc.get("extra_special_tokens") if fname == "tokenizer_config.json" else None
        for name, text in (named.items() if isinstance(named, dict) else ()):
            if isinstance(text, str) and text in texts and _PLACEHOLDER_TEXT.search(name):
                out.add(texts[text])
    return out


def random_prefixes(count: int, vocab: int, bos: int, special: set[int], sampling: Sampling, gen: torch.Generator):
    """Per row: BOS + 1..5 uniform tokens (specials replaced by BOS)."""
    rows = []
    for _ in range(count):
        n = int(torch.randint(sampling.prefix_min, sampling.prefix_max + 1, (1,), generator=gen))
        toks = torch.randint(0, vocab, (n,), generator=gen).tolist()
        rows.append([bos] + [bos if t in special else t for t in toks])
    return rows


def sample_next(logits: torch.Tensor, history: torch.Tensor, sampling: Sampling, gen: torch.Generator,
                suppress: set[int] = frozenset()) -> torch.Tensor:
    """One sampled token per row with transformers' own logits processors (as `generate` does); the
    ids in `suppress` are never sampled (transformers' `SuppressTokensLogitsProcessor` does the same)."""
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    scores = logits.detach().float().cpu()
    ids = [t for t in suppress if 0 <= t < scores.shape[-1]]
    if ids:
        scores[:, ids] = -float("inf")
    for proc in (
        RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty),
        TemperatureLogitsWarper(sampling.temperature),
        TopPLogitsWarper(sampling.top_p),
    ):
        scores = proc(history, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def decoder_start_id(runner) -> int | None:
    """The decoder start token id of an encoder-decoder model (the config transformers loaded says
    `is_encoder_decoder`, and the model's forward takes `decoder_input_ids`), None for a decoder-only
    one. It is the text config's `decoder_start_token_id`, else the top config's, else BOS (as
    transformers' `generate` falls back)."""
    import inspect

    text_cfg, top = runner.anatomy.text_config, getattr(runner.model, "config", None)
    if not (getattr(text_cfg, "is_encoder_decoder", False) or getattr(top, "is_encoder_decoder", False)):
        return None
    if "decoder_input_ids" not in inspect.signature(runner.model.forward).parameters:
        return None
    for cfg, key in ((text_cfg, "decoder_start_token_id"), (top, "decoder_start_token_id"),
                     (text_cfg, "bos_token_id"), (top, "bos_token_id")):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    raise DowserError(f"{runner.ckpt.where}: an encoder-decoder model whose config names no decoder_start_token_id "
                      "(nor bos_token_id) to start the decoder's input with")


def shift_right(ids: torch.Tensor, start: int) -> torch.Tensor:
    """The decoder's input for target tokens `ids` (B, T): the start token, then ids[:, :-1] (transformers'
    `shift_tokens_right`; probe tokens hold no -100 to replace)."""
    out = ids.new_full(ids.shape, start)
    out[:, 1:] = ids[:, :-1]
    return out


def _step_logits(runner, tokens: torch.Tensor, t: int, cache, start: int | None) -> torch.Tensor:
    """Last-position logits predicting token t + 1 of `tokens` (B, length) from tokens[:, :t+1].

    Decoder-only (`start` None): token t alone, through `cache`. Encoder-decoder: no cache, a full
    forward with the prefix as the encoder's input and the start token plus the prefix as the decoder's
    (the decoder's input for tokens[:, :t+2], `shift_right`, which needs none of token t + 1)."""
    if start is None:
        ids = tokens[:, t : t + 1].to(runner.device)
        if runner.keeps_loaded:
            return runner.step_logits(ids, cache)
        inputs = {"input_ids": ids, "cache": cache, "use_cache": True}
    else:
        prefix = tokens[:, : t + 1]
        decoder = shift_right(tokens[:, : t + 2], start)
        inputs = {"input_ids": prefix.to(runner.device), "decoder_input_ids": decoder.to(runner.device),
                  "use_cache": False}
        if runner.keeps_loaded:
            out = runner.model(**inputs)
            return (out.logits if hasattr(out, "logits") else out[0])[:, -1, :]
    # the weights fit in no memory tier: each step streams every layer (the floor)
    step = runner.capture(**inputs)
    h = step.hidden
    for i, layer in runner.stream(range(len(runner.layers))):
        h = step.call(i, layer, h, runner.tuple_out)
    return runner.head_logits(h)


@torch.no_grad()
def generate_text_probes(runner, count: int, length: int, seed: int, sampling: Sampling = Sampling(),
                         progress=None) -> torch.Tensor:
    """(count, length) token ids: random prefixes continued by the model, streamed layer by layer.

    One token per step for every row (rows still inside their random prefix are fed their
    next prefix token), with a KV cache (transformers' DynamicCache) kept across steps; an
    encoder-decoder runs a full forward over the prefix each step instead (`_step_logits`). Media
    placeholders (`placeholder_token_ids`) are neither drawn into prefixes nor sampled.
    """
    from transformers import DynamicCache

    config = runner.ckpt.config or {}
    text_cfg = runner.anatomy.text_config.to_dict()
    vocab = int(text_cfg["vocab_size"])
    bos, special = special_token_ids(runner.ckpt, text_cfg, config)
    placeholders = placeholder_token_ids(runner.ckpt, config) - {bos}
    special |= placeholders
    if not 0 <= bos < vocab:
        raise DowserError(f"{runner.ckpt.where}: the probes' first token (BOS, id {bos} from config.json or the "
                          f"tokenizer files) is outside the vocabulary (vocab_size {vocab}); fix bos_token_id or "
                          f"pass --probe-file")
    gen = torch.Generator().manual_seed(seed)
    prefixes = random_prefixes(count, vocab, bos, special, sampling, gen)
    tokens = torch.full((count, length), bos, dtype=torch.long)
    for r, p in enumerate(prefixes):
        tokens[r, : min(len(p), length)] = torch.tensor(p[:length])
    start = decoder_start_id(runner)  # an encoder-decoder: full forwards, no cache
    cache = DynamicCache(config=runner.anatomy.text_config) if start is None else None
    if runner.keeps_loaded:
        runner.load_all()  # every layer in memory: each step is one forward of the model itself
    for t in range(length - 1):
        logits = _step_logits(runner, tokens, t, cache, start)
        if not bool(torch.isfinite(logits).all()):  # an overflow in a half dtype: refuse, never sample from NaN
            dtype = str(logits.dtype).replace("torch.", "")
            raise DowserError(f"{runner.ckpt.where}: non-finite logits while generating probes, computing in {dtype} "
                              "(the activations overflow it); probe with --dtype float32")
        sampled = sample_next(logits, tokens[:, : t + 1], sampling, gen, placeholders)
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

        from ..io.layout import read_header

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


# Per-token processor outputs and the value a text token appended after the image takes.
_APPEND_VALUE = {"attention_mask": 1, "token_type_ids": 0, "mm_token_type_ids": 0}
_APPEND_REPEAT = ("cross_attention_mask",)  # Mllama: text after the image attends to it like the last token


class ImageProbe:
    """Gaussian-noise images run through the checkpoint's own processor (transformers'
    `AutoProcessor`), placed in front of the text probes.

    Each probe row r gets its own image, N(0.5, 0.25^2) per pixel and channel, clipped to
    [0, 1] and stored as uint8, of `side` pixels (the vision config's `image_size`, else 224:
    the processor resizes it as it would a real image). The processor expands the image
    placeholder into as many image tokens as the model needs and returns every extra input
    the model's forward takes (`pixel_values`, `image_grid_thw`, `image_sizes`,
    `pixel_attention_mask`, aspect-ratio ids, ...). The probe's token ids follow the
    processor's ids; per-token outputs are extended over them (attention mask 1, token
    type 0, Mllama's cross-attention mask as its last position).
    """

    def __init__(self, processor, prompt: str, count: int, seed: int, side: int, where: str):
        import numpy as np

        self.processor, self.prompt, self.where = processor, prompt, where
        gen = np.random.default_rng(seed + 1)
        self.images = [
            (np.clip(gen.normal(0.5, 0.25, (side, side, 3)), 0.0, 1.0) * 255).round().astype(np.uint8)
            for _ in range(count)
        ]
        self.extra_tokens = int(self._process([0])["input_ids"].shape[1])

    def _process(self, rows) -> dict:
        try:
            out = self.processor(text=[self.prompt] * len(rows), images=[[self.images[r]] for r in rows],
                                 return_tensors="pt")
        except Exception as e:
            raise DowserError(f"{self.where}: the model's processor could not process a noise image "
                              f"({reason(e, sentence=True)})") from None
        return dict(out)

    def inputs(self, rows: slice, ids: torch.Tensor) -> dict:
        """Model inputs for probe rows `rows` whose text token ids are `ids` (B, T)."""
        out = self._process(list(range(rows.start, rows.stop)))
        out.pop("labels", None)  # PaliGemma's processor adds training labels: the probe needs none
        n, extra = out["input_ids"].shape[1], ids.shape[1]
        for key, value in list(out.items()):
            if key == "input_ids" or not torch.is_tensor(value) or value.dim() < 2 or value.shape[1] != n:
                continue
            if key in _APPEND_VALUE:
                tail = torch.full((value.shape[0], extra, *value.shape[2:]), _APPEND_VALUE[key], dtype=value.dtype)
            elif key in _APPEND_REPEAT:
                tail = value[:, -1:].expand(value.shape[0], extra, *value.shape[2:])
            else:
                continue
            out[key] = torch.cat([value, tail], dim=1)
        out["input_ids"] = torch.cat([out["input_ids"], ids.to(out["input_ids"].dtype)], dim=1)
        return out


    def check(self, runner, inputs: dict) -> None:
        """Run the model's stem (embeddings, vision tower, projector) on the first batch's `inputs`
        (`inputs(...)` on the compute device) before any statistics: a processor that does not agree with
        its model (image tokens vs image features, an input the forward does not take) is one line naming
        the folder, the processor, the image tokens it made and what the model's forward says."""
        try:
            with torch.no_grad():
                runner.capture(**inputs)
        except DowserError:
            raise
        except Exception as e:
            config = runner.ckpt.config or {}
            token = next((config[k] for k in ("image_token_id", "image_token_index") if isinstance(config.get(k), int)),
                         None)
            ids = inputs.get("input_ids")
            made = (f" ({int((ids[0] == token).sum())} image tokens for one {self.images[0].shape[0]}px image)"
                    if token is not None and torch.is_tensor(ids) else "")
            raise DowserError(f"{self.where}: the checkpoint's processor ({type(self.processor).__name__}) and "
                              f"its model ({type(runner.model).__name__}) disagree on a noise image{made}: the "
                              f"model's forward refuses what the processor made ({reason(e)})") from None


def image_prompt(processor, config: dict) -> str | None:
    """The text that asks the processor for one image: its `image_token`, between the model's
    vision start/end tokens when its config names them (`vision_start_token_id`, Qwen-VL)."""
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str):
        return None
    start, end = config.get("vision_start_token_id"), config.get("vision_end_token_id")
    tokenizer = getattr(processor, "tokenizer", None)
    if isinstance(start, int) and isinstance(end, int) and tokenizer is not None:
        return f"{tokenizer.convert_ids_to_tokens(start)}{token}{tokenizer.convert_ids_to_tokens(end)}"
    return token


def load_processor(folder: str, where: str):
    """`transformers.AutoProcessor` for a checkpoint folder.

    A processor with a video part that cannot load here (transformers' video processors need
    torchvision; transformers says so with ImportError, ValueError or OSError depending on the
    folder: `_video_part_failed`) is built for images only, from the checkpoint's own image
    processor and tokenizer configs (`AutoImageProcessor`, `AutoTokenizer`) and its processor
    class with the video slot left out. Raises DowserError (one line) for anything else.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:
        missing = reason(e, sentence=True)
        cls = _processor_class(folder)
        if not _video_part_failed(e) or cls is None or "video_processor" not in cls.get_attributes():
            why = "needs a package that is not installed" if isinstance(e, ImportError) else "AutoProcessor cannot load"
            raise DowserError(f"{where}: --images needs the model's processor, which {why} ({missing})") from None
    try:
        return _images_only(cls, folder, where, missing)
    except DowserError:
        raise
    except Exception as e:
        raise DowserError(f"{where}: --images: {cls.__name__} cannot be built for images only either, its video "
                          f"part being unavailable ({missing}): {reason(e, sentence=True)}") from None


def _video_part_failed(e: BaseException) -> bool:
    """Whether an error of `AutoProcessor.from_pretrained` comes from the processor's video part (its
    video processor, or a package only it needs): raised inside transformers' video-processor code, or
    naming torchvision or a video processor."""
    tb = e.__traceback__
    while tb is not None:
        if "video_processing" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    text = str(e).lower()
    return "torchvision" in text or "videoprocessor" in text or "video processor" in text


def _images_only(cls, folder: str, where: str, missing: str):
    """`cls` (a processor class with a video slot) built from the folder's image processor and tokenizer,
    the video slot left out."""
    from transformers import AutoImageProcessor, AutoTokenizer

    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    image_only = type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda c: list(attributes))})
    parts = {"image_processor": AutoImageProcessor.from_pretrained(folder, trust_remote_code=False),
             "tokenizer": AutoTokenizer.from_pretrained(folder, trust_remote_code=False)}
    if set(attributes) - set(parts):
        raise DowserError(f"{where}: --images: {cls.__name__} needs {', '.join(attributes)}, and its video part "
                          f"cannot load here ({missing})")
    processor_dict, kwargs = cls.get_processor_dict(folder)
    try:
        return image_only.from_args_and_dict([parts[a] for a in attributes], processor_dict, **kwargs)
    except ImportError as e:
        raise DowserError(f"{where}: --images needs the model's processor, which needs a package that is not "
                          f"installed ({reason(e, sentence=True)})") from None


def _processor_class(folder: str):
    """The processor class a folder names (processor_config.json), else the one for its model_type."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    path = Path(folder)
    name = None
    for fname in ("processor_config.json", "preprocessor_config.json"):
        if (path / fname).is_file():
            name = json.loads((path / fname).read_text()).get("processor_class") or name
    if name is None and (path / "config.json").is_file():
        name = PROCESSOR_MAPPING_NAMES.get(json.loads((path / "config.json").read_text()).get("model_type"))
    try:  # a class whose module needs a missing package is a placeholder that raises ImportError on use
        cls = getattr(transformers, name) if name else None
        return cls if cls is not None and callable(getattr(cls, "get_attributes", None)) and cls.get_attributes() else None
    except (AttributeError, ImportError):
        return None


_PROCESSOR_FILES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def _processor_folder(ckpt):
    """A local folder holding the checkpoint's tokenizer and processor files (for a Hub
    checkpoint: those files downloaded into the HF cache snapshot, weights left out)."""
    small = [n for n in ckpt.files() if "/" not in n and n.endswith(_PROCESSOR_FILES) and "index" not in n]
    paths = [ckpt.file_path(n) for n in small]
    return paths[0].parent if paths else ckpt.file_path("config.json").parent


def image_processor(ckpt) -> tuple:
    """(processor, prompt, side) for noise-image probes: the checkpoint's AutoProcessor, a prompt
    with its image placeholder, and the image side in pixels.

    Raises DowserError when the checkpoint ships no processor that handles images.
    """
    processor = load_processor(str(_processor_folder(ckpt)), ckpt.where)
    prompt = image_prompt(processor, ckpt.config or {})
    if prompt is None or getattr(processor, "image_processor", None) is None:
        raise DowserError(f"{ckpt.where}: --images needs a processor with an image processor and an image token; "
                          f"{type(processor).__name__} has none")
    vision = (ckpt.config or {}).get("vision_config") or {}
    size = vision.get("image_size") or 224
    side = int(max(size) if isinstance(size, (list, tuple)) else size)  # InternVL gives [height, width]
    return processor, prompt, side
