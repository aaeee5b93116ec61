"""The test oracle: the published algorithm, in memory, with plain autograd.

Whole model loaded, every parameter requiring grad, and for each probe batch M
full forward and backward passes, one per Rademacher draw; hooks on the scored
linears record |input| and |output gradient| means (Model-Dowser's released
scripts). The streamed probe must reproduce these statistics.

Mixture-of-experts layers that fuse all experts into 3-D parameters are first
rewritten into one nn.Linear per expert and projection (`per_expert_linears`),
an independent re-implementation of the experts' forward, so that plain module
hooks see each expert's own tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from dowser_tool.probe.run import rademacher


class _ExpertLinears(nn.Module):
    """Mixtral / Qwen-MoE experts as per-expert Linears: out = sum_k w_k * down_e(act(gate_e(x)) * up_e(x))."""

    def __init__(self, experts):
        super().__init__()
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        n, two_i, h = gate_up.shape
        self.num_experts, self.act = n, experts.act_fn
        self.gate = nn.ModuleList(nn.Linear(h, two_i // 2, bias=False) for _ in range(n))
        self.up = nn.ModuleList(nn.Linear(h, two_i // 2, bias=False) for _ in range(n))
        self.down = nn.ModuleList(nn.Linear(two_i // 2, h, bias=False) for _ in range(n))
        for e in range(n):
            self.gate[e].weight = nn.Parameter(gate_up[e, : two_i // 2].clone())
            self.up[e].weight = nn.Parameter(gate_up[e, two_i // 2 :].clone())
            self.down[e].weight = nn.Parameter(down[e].clone())

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            y = self.down[e](self.act(self.gate[e](x)) * self.up[e](x)) * top_k_weights[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))
        return out


def per_expert_linears(model) -> dict[tuple[str, int, str], str]:
    """Replace fused experts modules in place; returns {(experts module, expert, 'gate'|'up'|'down'): linear path}."""
    paths = {}
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and getattr(mod.gate_up_proj, "dim", lambda: 0)() == 3:
            parent, _, attr = name.rpartition(".")
            new = _ExpertLinears(mod)
            setattr(model.get_submodule(parent), attr, new)
            for e in range(new.num_experts):
                for part in ("gate", "up", "down"):
                    paths[(name, e, part)] = f"{name}.{part}.{e}"
    return paths


def oracle_module(weight, expert_paths) -> str:
    """The oracle model's module path for a probe Weight (expert slices map to per-expert Linears)."""
    if weight.expert is None:
        return weight.module
    if weight.param.endswith("down_proj"):
        part = "down"
    else:
        part = "gate" if weight.rows[0] == 0 else "up"
    return expert_paths[(weight.module, weight.expert, part)]


def reference_statistics(model, modules: dict[str, str], batches: list[dict], draws: int, seed: int,
                         estimator: str = "reference", head_keys=(), unit_activation=()):
    """{key: (psi (U, out), a (U, in))} and update weights, computed the slow way.

    modules: scored key -> module path in `model`; batches: the model inputs of each probe
    batch (the probe's own, so both see identical inputs); head_keys get psi = 1 and
    unit_activation keys a = 1 (the released scripts' boundary rules).
    """
    for p in model.parameters():
        p.requires_grad_(True)
    psi = {k: [] for k in modules}
    act = {k: [] for k in modules}
    weights = []
    for b, inputs in enumerate(batches):
        seen_a, per_draw = {}, {k: [] for k in modules}

        def bwd(key):
            def hook(g):
                g = g.detach().float()
                dims = tuple(range(g.dim() - 1))
                per_draw[key].append(g.pow(2).mean(dims) if estimator == "hutchinson" else g.abs().mean(dims))
            return hook

        def fwd(key):  # a from the input; psi from the output's gradient (a tensor hook: the model may
            def hook(m, inp, out):  # modify the output in place, which a full backward hook forbids)
                if isinstance(out, tuple):  # Llama 4's router returns (routing scores, router logits)
                    assert type(m).__name__ == "Llama4Router", type(m).__name__
                    out = out[1]
                h = inp[0].detach().float()
                seen_a[key] = h.abs().mean(tuple(range(h.dim() - 1)))
                if out.requires_grad:
                    out.register_hook(bwd(key))
            return hook

        handles = [model.get_submodule(path).register_forward_hook(fwd(key)) for key, path in modules.items()]
        xi = None
        for d in range(draws):
            logits = model(**inputs).logits[:, -1, :]
            if xi is None:
                xi = rademacher(seed, b, draws, logits.shape)
            model.zero_grad(set_to_none=True)
            ((xi[d] * logits).sum() / logits.shape[0]).backward()
        for h in handles:
            h.remove()
        for key, path in modules.items():
            weight = model.get_submodule(path).weight
            out_f = weight.shape[1] if type(model.get_submodule(path)).__name__ == "Conv1D" else weight.shape[0]
            in_f = weight.numel() // out_f
            p = torch.stack(per_draw[key]).mean(0) if per_draw[key] else torch.zeros(out_f)  # unused module
            p = p.sqrt() if estimator == "hutchinson" else p
            if key in head_keys:
                p = torch.ones_like(p)
            a = seen_a.get(key, torch.zeros(in_f))
            a = torch.ones_like(a) if key in unit_activation else a
            psi[key].append(p)
            act[key].append(a)
        weights.append(float(inputs["input_ids"].shape[0]))
    return {k: (torch.stack(psi[k]), torch.stack(act[k])) for k in modules}, torch.tensor(weights)


def load_in_memory(run, folder):
    """The whole model, loaded by transformers' own from_pretrained with the probe's class and
    attention implementation, in float32."""
    cls = type(run.anatomy.model)
    attn = run.anatomy.model.config._attn_implementation
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()


def oracle_for_run(run, folder=None, model=None):
    """Reference statistics for exactly what `run` (a ProbeRun whose tokens are set) scores,
    on the same inputs: ({key: (psi, a)}, update weights)."""
    model = model if model is not None else load_in_memory(run, folder)
    paths = per_expert_linears(model)
    modules = {w.key: oracle_module(w, paths) for w in run.weights}
    batches = [run._inputs(rows) for _, rows in run.batches()]
    return reference_statistics(
        model, modules, batches, run.s.draws, run.s.seed, run.s.estimator,
        head_keys={w.key for w in run.head_weights},
        unit_activation={w.key for w in run.stem_weights if w.part == "projector"},
    )


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def assert_run_matches_oracle(run, rec, folder, rtol=1e-5, model=None):
    """Every scored weight's psi and a equal the oracle's to `rtol` (relative to the largest entry)."""
    want, w = oracle_for_run(run, folder, model)
    assert torch.equal(torch.tensor(run.update_weights), w)
    for x in run.weights:
        for got, exp, what in ((rec.psi[x.key], want[x.key][0], "psi"), (rec.a[x.key], want[x.key][1], "a")):
            err = relative_error(torch.stack(got), exp)
            assert err <= rtol, f"{x.key} {what}: relative error {err:.2e}"
    return want, w
