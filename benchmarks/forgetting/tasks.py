"""Synthetic tasks with exact-match answers: text tasks for the LM, drawn shapes for the VLM.

An example is (prompt words, answer words, image or None). Each sequence is
`<s> [image tokens] prompt = answer </s>`; the loss and the score cover the
answer and `</s>` only.
"""

from __future__ import annotations

import random

import torch

from .tokenizer import BOS, COLOURS, EOS, IMAGE, KEYS, PAD, SHAPES, encode

IMAGE_SIZE, PATCH = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def _digits(rng, lo=3, hi=6):
    return [rng.randrange(10) for _ in range(rng.randint(lo, hi))]


def _words(xs):
    return " ".join(map(str, xs))


# ---- text tasks (LM) -----------------------------------------------------
def copy(rng):
    xs = _digits(rng)
    return f"copy {_words(xs)}", _words(xs), None


def reverse(rng):
    xs = _digits(rng)
    return f"reverse {_words(xs)}", _words(xs[::-1]), None


def sort(rng):
    xs = _digits(rng)
    return f"sort {_words(xs)}", _words(sorted(xs)), None


def add(rng):
    # Digits least significant first (47 + 35 = 82 is `7 4 + 5 3 = 2 8 0`): the order in which
    # carries flow, which a small transformer learns far faster than the written order.
    a, b = rng.randrange(100), rng.randrange(100)
    return f"add {_words(f'{a:02d}'[::-1])} + {_words(f'{b:02d}'[::-1])}", _words(f"{a + b:03d}"[::-1]), None


def recall(rng):
    keys = rng.sample(KEYS, 3)
    vals = [rng.randrange(10) for _ in keys]
    q = rng.randrange(3)
    pairs = " ".join(f"{k} {v}" for k, v in zip(keys, vals))
    return f"recall {pairs} ? {keys[q]}", str(vals[q]), None


def rotate(rng):
    # Downstream: never seen in pretraining; built from the copying skill, but every answer moves.
    xs = _digits(rng)
    return f"rotate {_words(xs)}", _words(xs[1:] + xs[:1]), None


# ---- image tasks (VLM) ---------------------------------------------------
RGB = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}


def _scene(rng):
    """One shape of a random colour, shape, size and quadrant; pixels in [0, 1]."""
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    qy, qx = rng.randrange(2), rng.randrange(2)
    r = rng.randint(5, 7)
    half = IMAGE_SIZE // 2
    cy, cx = qy * half + rng.randint(r, half - r - 1), qx * half + rng.randint(r, half - r - 1)
    y, x = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    dy, dx = (y - cy).float(), (x - cx).float()
    inside = {
        "square": (dx.abs() <= r) & (dy.abs() <= r),
        "circle": dx**2 + dy**2 <= r * r,
        "triangle": (dy <= r) & (dx.abs() <= (dy + r) / 2),
        "cross": ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r)),
    }[shape]
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    img = 0.1 + 0.05 * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    img[:, inside] = torch.tensor(RGB[colour])[:, None]
    place = f"{('top', 'bottom')[qy]} {('left', 'right')[qx]}"
    return img.clamp(0, 1), colour, shape, place


def colour(rng):
    img, c, _, _ = _scene(rng)
    return "colour ?", c, img


def shape(rng):
    img, _, s, _ = _scene(rng)
    return "shape ?", s, img


def where(rng):
    # Downstream: the quadrant of the shape (two answer words, chance 1/4).
    img, _, _, p = _scene(rng)
    return "where ?", p, img


LM_UPSTREAM = {"copy": copy, "reverse": reverse, "sort": sort, "add": add, "recall": recall}
LM_DOWNSTREAM = {"rotate": rotate}
VLM_UPSTREAM = {"colour": colour, "shape": shape}
VLM_DOWNSTREAM = {"where": where}

# Normalisation of the tiny CLIP tower (CLIP's constants, as a processor would apply them).
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def collate(examples):
    """Right-padded input_ids, attention_mask, labels (-100 outside answers), pixel_values."""
    seqs, starts = [], []
    for prompt, answer, img in examples:
        head = [BOS] + ([IMAGE] * IMAGE_TOKENS if img is not None else []) + encode(prompt) + encode("=")
        seqs.append(head + encode(answer) + [EOS])
        starts.append(len(head))
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), PAD)
    labels = torch.full((len(seqs), T), -100)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, st : len(s)] = ids[i, st : len(s)]
        mask[i, : len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if examples[0][2] is not None:
        batch["pixel_values"] = (torch.stack([e[2] for e in examples]) - MEAN) / STD
    return batch


def sample(tasks: dict, n: int, rng: random.Random):
    """n examples, tasks drawn uniformly (a mixture for pretraining)."""
    fns = list(tasks.values())
    return [rng.choice(fns)(rng) for _ in range(n)]


def eval_set(task_fn, n: int, seed: int):
    # A fixed set per task: the same examples score every model of a run.
    rng = random.Random(seed)
    return collate([task_fn(rng) for _ in range(n)])
