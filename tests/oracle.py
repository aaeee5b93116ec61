"""The test oracle: the published algorithm, in memory, with plain autograd.

Whole model loaded, every parameter requiring grad, and for each probe batch M
full forward and backward passes, one per Rademacher draw; hooks on the scored
linears record |input| and |output gradient| means (METHOD.md). The streamed
probe must reproduce these statistics.
"""

from __future__ import annotations

import torch

from dowser_tool.probe import rademacher


def reference_statistics(model, scored, tokens, batch_size, draws, seed, estimator="reference",
                         pixel_values=None, image_token=None, n_image_tokens=0, head="lm_head.weight",
                         unit_activation=()):
    """{canonical name: (psi (U, out), a (U, in))} and update weights, computed the slow way."""
    for p in model.parameters():
        p.requires_grad_(True)
    modules = {n: model.get_submodule(n.rpartition(".")[0]) for n in scored}
    psi = {n: [] for n in scored}
    act = {n: [] for n in scored}
    weights = []
    for b, start in enumerate(range(0, tokens.shape[0], batch_size)):
        ids = tokens[start : start + batch_size]
        inputs = {"input_ids": ids}
        if pixel_values is not None:
            pre = torch.full((ids.shape[0], n_image_tokens), image_token, dtype=ids.dtype)
            inputs = {"input_ids": torch.cat([pre, ids], 1), "pixel_values": pixel_values[start : start + batch_size]}
        seen_a, per_draw = {}, {n: [] for n in scored}

        def fwd(name):
            def hook(m, inp, out):
                h = inp[0].detach().float()
                seen_a[name] = h.abs().mean(tuple(range(h.dim() - 1)))
            return hook

        def bwd(name):
            def hook(m, grad_in, grad_out):
                g = grad_out[0].detach().float()
                dims = tuple(range(g.dim() - 1))
                per_draw[name].append(g.pow(2).mean(dims) if estimator == "hutchinson" else g.abs().mean(dims))
            return hook

        handles = [modules[n].register_forward_hook(fwd(n)) for n in scored]
        handles += [modules[n].register_full_backward_hook(bwd(n)) for n in scored]
        xi = None
        for d in range(draws):
            logits = model(**inputs).logits[:, -1, :]
            if xi is None:
                xi = rademacher(seed, b, draws, logits.shape)
            model.zero_grad(set_to_none=True)
            ((xi[d] * logits).sum() / logits.shape[0]).backward()
        for h in handles:
            h.remove()
        for n in scored:
            out_f = modules[n].weight.shape[0]
            p = torch.stack(per_draw[n]).mean(0) if per_draw[n] else torch.zeros(out_f)  # unused layer
            p = p.sqrt() if estimator == "hutchinson" else p
            if n == head:
                p = torch.ones_like(p)
            a = torch.ones_like(seen_a[n]) if n in unit_activation else seen_a[n]
            psi[n].append(p)
            act[n].append(a)
        weights.append(float(ids.shape[0]))
    return {n: (torch.stack(psi[n]), torch.stack(act[n])) for n in scored}, torch.tensor(weights)
