"""Synthetic tasks with exact-match answers: text tasks for the LM, drawn shapes for the VLM.

An example is (prompt words, answer words, image or None). Each sequence is
`<s> [image tokens] prompt = answer </s>`; the loss and the score cover the
answer and `</s>` only.
"""

from __future__ import annotations

import random

import torch

from .tokenizer import BOS, COLOURS, EOS, IMAGE, KEYS, PAD, PLACES, SHAPES, encode

IMAGE_SIZE, PATCH = 32, 16  # one patch per quadrant: 4 image tokens
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


def increment(rng):
    # Downstream alternative: copy with every digit moved up by one (9 -> 0); same digits, new map.
    xs = _digits(rng)
    return f"increment {_words(xs)}", _words([(x + 1) % 10 for x in xs]), None


# ---- image tasks (VLM) ---------------------------------------------------
# A scene holds 1-4 shapes, at most one per quadrant; every question is answered with
# one digit, so upstream and downstream share their answers and the new task cannot be
# learned by moving the answer prior (the earlier word-answer `where` task could).
RGB = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}
_GRID = None


def _inside(shape: str, dy, dx, r):
    return {
        "square": (dx.abs() <= r) & (dy.abs() <= r),
        "circle": dx**2 + dy**2 <= r * r,
        "triangle": (dy <= r) & (dx.abs() <= (dy + r) / 2),
        "cross": ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r)),
    }[shape]


def _layout(rng):
    """1-4 shapes, at most one per quadrant: [(row, col, colour, shape, radius, cy, cx)];
    quadrant rows and columns are 0 (top / left) or 1. The count is uniform over 1-4."""
    half, objects = IMAGE_SIZE // 2, []
    for q in sorted(rng.sample(range(4), rng.randint(1, 4))):
        qy, qx = divmod(q, 2)
        colour, shape, r = rng.choice(COLOURS), rng.choice(SHAPES), rng.randint(4, 6)
        cy, cx = qy * half + rng.randint(r, half - r - 1), qx * half + rng.randint(r, half - r - 1)
        objects.append((qy, qx, colour, shape, r, cy, cx))
    return objects


def _render(rng, objects):
    """The image of a layout: shapes of flat colour on dim noise, pixels in [0, 1], (3, 32, 32)."""
    global _GRID
    if _GRID is None:
        _GRID = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    y, x = _GRID
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    img = 0.1 + 0.05 * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    for _, _, colour, shape, r, cy, cx in objects:
        img[:, _inside(shape, (y - cy).float(), (x - cx).float(), r)] = torch.tensor(RGB[colour])[:, None]
    return img.clamp(0, 1)


def _scene(rng):
    objects = _layout(rng)
    return _render(rng, objects), objects


def _balanced(rng, question):
    """A scene and question whose answer is uniform over 0, 1, 2 (drawn first, then
    scenes are drawn until one has it), so always answering one digit scores 1/3."""
    want = rng.randrange(3)
    while True:
        objs = _layout(rng)
        prompt, n = question(rng, objs)
        if n == want:
            return prompt, str(n), _render(rng, objs)


def count(rng):
    img, objs = _scene(rng)
    return "count ?", str(len(objs)), img


def count_colour(rng):
    def q(rng, objs):
        c = rng.choice(COLOURS)
        return f"count {c} ?", sum(o[2] == c for o in objs)
    return _balanced(rng, q)


def count_shape(rng):
    def q(rng, objs):
        s = rng.choice(SHAPES)
        return f"count {s} ?", sum(o[3] == s for o in objs)
    return _balanced(rng, q)


HALVES = {"top": (0, 0), "bottom": (0, 1), "left": (1, 0), "right": (1, 1)}  # (row or column, which)


def count_half(rng):
    # Downstream: count the shapes in one half of the image (top, bottom, left or right):
    # the counting skill and digit answers of pretraining, a question it never saw.
    def q(rng, objs):
        p = rng.choice(PLACES)
        axis, side = HALVES[p]
        return f"count {p} ?", sum(o[axis] == side for o in objs)
    return _balanced(rng, q)


LM_UPSTREAM = {"copy": copy, "reverse": reverse, "sort": sort, "add": add, "recall": recall}
LM_DOWNSTREAM = {"rotate": rotate}
VLM_UPSTREAM = {"count": count, "count-colour": count_colour, "count-shape": count_shape}
VLM_DOWNSTREAM = {"count-half": count_half}

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
