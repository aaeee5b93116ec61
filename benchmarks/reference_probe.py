"""The published Dowser algorithm as it runs in memory: the baseline every probe figure is compared with.

Whole model loaded, every parameter requiring grad, M full forward and backward
passes per probe batch, and one score matrix psi (x) |W| (x) a accumulated per
update (a running mean, as the released scripts do). Same probes (a token file)
and the same Rademacher draws as `dowser probe --probe-file`.

    python -m benchmarks.reference_probe MODEL TOKENS.jsonl OUT.safetensors [--batch-size 4] [--draws 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dowser_tool.probe.run import rademacher


def load_model(folder: str, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(folder)
    auto = AutoModelForImageTextToText if cfg.model_type == "llava" else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()


def scored_modules(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the decoder's layers (the benchmark's Llama models: q/k/v/o/gate/up/down),
    by in-memory parameter name."""
    layers = model.get_decoder().layers
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return {f"{prefix}.{name}.weight": module for name, module in layers.named_modules()
            if isinstance(module, torch.nn.Linear)}


def reference_scores(model, tokens: torch.Tensor, batch_size: int, draws: int, seed: int):
    """{parameter name: mean score matrix} over all (batch, draw) updates, weighted by batch size."""
    for p in model.parameters():
        p.requires_grad_(True)
    modules = scored_modules(model)
    act, sens = {}, {}
    handles = []
    for n, m in modules.items():
        handles.append(m.register_forward_hook(
            lambda mod, inp, out, n=n: act.__setitem__(n, inp[0].detach().abs().mean(tuple(range(inp[0].dim() - 1))))))
        handles.append(m.register_full_backward_hook(
            lambda mod, gin, gout, n=n: sens.__setitem__(n, gout[0].detach().abs().mean(tuple(range(gout[0].dim() - 1))))))
    scores = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
    total = 0.0
    for b, start in enumerate(range(0, tokens.shape[0], batch_size)):
        ids = tokens[start : start + batch_size]
        w = float(ids.shape[0])
        xi = None
        for d in range(draws):
            logits = model(input_ids=ids).logits[:, -1, :]
            if xi is None:
                xi = rademacher(seed, b, draws, logits.shape)
            model.zero_grad(set_to_none=True)
            ((xi[d] * logits).sum() / logits.shape[0]).backward()
            total += w
            for n, m in modules.items():  # running weighted mean of psi (x) |W| (x) a
                update = sens[n].float()[:, None] * m.weight.detach().float().abs() * act[n].float()[None, :]
                scores[n].add_((update - scores[n]) * (w / total))
    for h in handles:
        h.remove()
    return scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("tokens", help="JSONL token lists (the same file given to dowser probe --probe-file)")
    ap.add_argument("out", help="safetensors file for the score matrices")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    from dowser_tool.probe.prompts import load_probe_file

    t0 = time.perf_counter()
    model = load_model(args.model)
    tokens = load_probe_file(args.tokens)
    scores = reference_scores(model, tokens, args.batch_size, args.draws, args.seed)
    save_file({n: s.contiguous() for n, s in scores.items()}, args.out)
    print(json.dumps({"figure": "reference_probe", "seconds": round(time.perf_counter() - t0, 2),
                      "matrices": len(scores)}))


if __name__ == "__main__":
    main()
