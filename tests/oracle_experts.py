"""The in-memory oracle for stored 3-D expert stacks (tests/oracle.py's, per expert).

GPT-OSS keeps its experts in `gate_up_proj` (experts, in, out; gate and up interleaved) and
`down_proj` (experts, in, out), with biases; Llama 4 the same without biases, gate then up,
multiplied by one bmm over all experts. `GptOssExpertLinears` and `Llama4ExpertLinears`
re-implement those forwards with one nn.Linear per expert and projection, so that plain module hooks see each expert's own
tokens; `stack_oracle` compares the probe's statistics of each stack (its experts end to end)
with those hooks' statistics, expert by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from dowser_tool.model.experts import is_stack

from .oracle import load_in_memory, per_expert_linears, reference_statistics, relative_error


class GptOssExpertLinears(nn.Module):
    """GptOssExperts.forward with per-expert Linears: gate_up_e(x) = x W_e + b_e, clamp-GLU, down_e."""

    def __init__(self, experts):
        super().__init__()
        n = experts.gate_up_proj.shape[0]
        self.num_experts, self.alpha, self.limit = n, experts.alpha, experts.limit
        self.gate_up = nn.ModuleList(self._linear(experts.gate_up_proj[e], experts.gate_up_proj_bias[e]) for e in range(n))
        self.down = nn.ModuleList(self._linear(experts.down_proj[e], experts.down_proj_bias[e]) for e in range(n))

    @staticmethod
    def _linear(w_in_out, bias):
        lin = nn.Linear(w_in_out.shape[0], w_in_out.shape[1], bias=bias is not None)
        lin.weight = nn.Parameter(w_in_out.detach().T.clone())
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().clone())
        return lin

    def forward(self, hidden_states, router_indices=None, routing_weights=None):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(router_indices == e)
            if token.numel() == 0:
                continue
            gate_up = self.gate_up[e](hidden_states[token])
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            y = self.down[e]((up + 1) * gate * torch.sigmoid(gate * self.alpha))
            out = out.index_add(0, token, (y * routing_weights[token, slot, None]).to(out.dtype))
        return out


class Llama4ExpertLinears(nn.Module):
    """Llama4TextExperts.forward with per-expert Linears: every expert gets every token, scaled by its routing
    weight (zero for a token not routed to it); each expert's Linears run on its nonzero rows only."""

    def __init__(self, experts):
        super().__init__()
        n, self.hidden, self.act = experts.num_experts, experts.hidden_size, experts.act_fn
        self.gate_up = nn.ModuleList(GptOssExpertLinears._linear(experts.gate_up_proj[e], None) for e in range(n))
        self.down = nn.ModuleList(GptOssExpertLinears._linear(experts.down_proj[e], None) for e in range(n))
        self.num_experts = n

    def forward(self, hidden_states):
        x = hidden_states.view(self.num_experts, -1, self.hidden)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows = torch.where(x[e].ne(0).any(-1))[0]
            if rows.numel():
                gate, up = self.gate_up[e](x[e, rows]).chunk(2, dim=-1)
                out = out.index_put((torch.full_like(rows, e), rows), self.down[e](up * self.act(gate)))
        return out.view(-1, self.hidden)


def _split(model, cls_name: str, make) -> dict[str, list[str]]:
    """Replace every module of class `cls_name` by `make(module)` in place; {experts module path +
    '.gate_up_proj'|'.down_proj': [linear paths]}."""
    paths = {}
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == cls_name:
            parent, _, attr = name.rpartition(".")
            new = make(mod)
            setattr(model.get_submodule(parent), attr, new)
            paths[f"{name}.gate_up_proj"] = [f"{name}.gate_up.{e}" for e in range(new.num_experts)]
            paths[f"{name}.down_proj"] = [f"{name}.down.{e}" for e in range(new.num_experts)]
    return paths


def _stack_parts(model) -> dict[str, list[list[str]]]:
    """Replace the fused experts modules of `model` by per-expert Linears; {stack parameter: per expert, the
    Linear paths whose outputs are that expert's output rows, in order}."""
    split = {**_split(model, "GptOssExperts", GptOssExpertLinears), **_split(model, "Llama4TextExperts", Llama4ExpertLinears)}
    parts = {param: [[p] for p in paths] for param, paths in split.items()}
    paths = per_expert_linears(model)  # Mixtral / Qwen-MoE layout: gate rows, then up rows
    for (module, e, part), path in sorted(paths.items()):
        param = f"{module}.down_proj" if part == "down" else f"{module}.gate_up_proj"
        rows = parts.setdefault(param, [])
        while len(rows) <= e:
            rows.append([])
        rows[e].append(path)
    for param, rows in parts.items():  # gate before up
        for r in rows:
            r.sort(key=lambda p: 0 if ".gate." in p else 1)
    return parts


def stack_oracle(run, rec, folder, rtol=1e-5) -> dict[str, float]:
    """Every scored weight's psi and a equal the oracle's to `rtol`; a stack's expert by expert (each
    relative to that expert's largest entry). Returns the worst relative error per key."""
    model = load_in_memory(run, folder)
    parts = _stack_parts(model)
    modules = {}
    for w in run.weights:
        if is_stack(w):
            for e, paths in enumerate(parts[w.param]):
                modules.update({f"{w.key}#{e}#{j}": p for j, p in enumerate(paths)})
        else:
            modules[w.key] = w.module
    batches = [run._inputs(rows) for _, rows in run.batches()]
    want, _ = reference_statistics(model, modules, batches, run.s.draws, run.s.seed, run.s.estimator,
                                   head_keys={w.key for w in run.head_weights})
    worst = {}
    for w in run.weights:
        got_psi, got_a = torch.stack(rec.psi[w.key]), torch.stack(rec.a[w.key])
        pairs = [(got_psi, want[w.key][0], "psi"), (got_a, want[w.key][1], "a")] if not is_stack(w) else []
        for e, paths in enumerate(parts.get(w.param, []) if is_stack(w) else []):
            n = len(parts[w.param])
            psi_e = torch.cat([want[f"{w.key}#{e}#{j}"][0] for j in range(len(paths))], dim=1)
            pairs += [(got_psi.reshape(len(got_psi), n, -1)[:, e], psi_e, f"psi[{e}]"),
                      (got_a.reshape(len(got_a), n, -1)[:, e], want[f"{w.key}#{e}#0"][1], f"a[{e}]")]
        for got, exp, what in pairs:
            err = relative_error(got, exp) if bool(exp.any()) else float(got.abs().max())
            worst[w.key] = max(worst.get(w.key, 0.0), err)
            assert err <= rtol, f"{w.key} {what}: relative error {err:.2e}"
    return worst
