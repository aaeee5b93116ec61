"""Copy a pretrained benchmark model into examples/ with a model card."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from safetensors import safe_open

from .run import KINDS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CARD = """# {name}

A {what} pretrained from scratch by the forgetting benchmark
(`python -m benchmarks.forgetting`, pretraining seed 0) on synthetic tasks with
exact-match answers. It exists so the quick start and examples run on a model that
has actually learned something. Architecture: `{arch}`, {params:,} parameters,
float32, word-level tokenizer (`tokenizer.json`, built offline with `tokenizers`).

## Tasks it learned (held-out exact-match accuracy)
{accs}
{chance}

Sequences are `<s> {image}PROMPT = ANSWER </s>`; {format}
The downstream task of the benchmark (`{down}`) was never trained: it is what the
benchmark fine-tunes on to measure forgetting (see `benchmarks/forgetting/RESULTS.md`).

## Use
```bash
dowser probe examples/{name} --out {name}.dowser.safetensors --force
```
"""

FORMATS = {
    "lm": ("small Llama-architecture language model", "",
           "for example `<s> sort 3 1 2 = 1 2 3 </s>`, `<s> recall a 3 c 5 b 1 ? c = 5 </s>`, and "
           "`<s> add 7 4 + 5 3 = 2 8 0 </s>` (47 + 35 = 82: digits least significant first)."),
    "vlm": ("small LLaVA-architecture vision-language model (CLIP-style tower, 32x32 images, 16x16 patches: "
            "4 image tokens, one per quadrant)",
            "<image>x4 ", "for example `count ? = 3`, `count red ? = 1`, `count circle ? = 0` about 1-4 drawn "
            "shapes, at most one per quadrant. `AutoProcessor.from_pretrained` loads its `LlavaProcessor` "
            "(`processor_config.json`: resize to 32x32, rescale, CLIP's mean and std; `<image>` expands to 4 tokens)."),
}


CHANCE = {"vlm": "\nAnswers are balanced, so guessing one digit scores 1/4 on `count` and 1/3 on the others: "
                "the colour and shape counts are learned only partly.\n"}


def export(kind: str, base: Path, zero_shot: dict) -> Path:
    name = KINDS[kind]["example"]
    dest = EXAMPLES / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base, dest)

    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    arch = json.loads((dest / "config.json").read_text())["architectures"][0]
    what, image, fmt = FORMATS[kind]
    accs = "\n".join(f"- `{t}`: {zero_shot[f'acc/{t}']:.3f}" for t in KINDS[kind]["up"])
    chance = CHANCE.get(kind, "")
    (dest / "README.md").write_text(CARD.format(name=name, what=what, arch=arch, params=params, accs=accs, chance=chance,
                                                image=image, format=fmt, down=next(iter(KINDS[kind]["down"]))))
    return dest
