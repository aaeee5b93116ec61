"""A word-level tokenizer built offline with the `tokenizers` library.

Every task is written as space-separated words from a closed vocabulary, so one
token per word keeps the models tiny and makes exact-match scoring trivial.
"""

from __future__ import annotations

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
DIGITS = [str(d) for d in range(10)]
KEYS = list("abcdefgh")
TASK_WORDS = ["copy", "reverse", "sort", "add", "recall", "rotate", "colour", "shape", "where"]
PUNCT = ["=", "+", "?"]
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["square", "circle", "triangle", "cross"]
PLACES = ["top", "bottom", "left", "right"]
VOCAB = SPECIALS + DIGITS + KEYS + TASK_WORDS + PUNCT + COLOURS + SHAPES + PLACES + ["count", "increment"]


def build_tokenizer():
    """A transformers fast tokenizer over VOCAB (ids are list positions)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


ID = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, EOS, IMAGE = ID["<pad>"], ID["<s>"], ID["</s>"], ID["<image>"]


def encode(words: str) -> list[int]:
    # Benchmark data never goes through the fast tokenizer: a dict lookup is exact and quick.
    return [ID[w] for w in words.split()]
