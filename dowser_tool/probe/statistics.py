"""Per-update Dowser statistics of every scored weight, recorded by hooks during the probe.

For a linear weight W (out x in) with input h and output z = W h, one update u
(a probe batch) records (Model-Dowser, Sec. 3; the released scripts' reductions):
- a_u (in): mean over batch and token positions of |h| (`wanda`: root mean square);
- psi_u (out): with g = d(xi . f / B)/dz for each of the M Rademacher draws xi of
  the last-position logits f, the mean over draws of mean |g| (`reference`, as the
  released scripts) or sqrt(mean over draws of mean g^2) (`hutchinson`, the paper's
  E[g^2] = ||J_i||^2).

nn.Linear and transformers' Conv1D are recorded with forward hooks on the module (an nn.Linear
subclass with a forward of its own, Llama 4's router, by the torch function mode below).
Mixture-of-experts layers that keep all experts in one 3-D parameter call
`F.linear(x, param[e])` (or `x @ param[e]` for experts stored (in, out), GPT-OSS) once per
expert, or `torch.bmm(x, param)` once for all experts (Llama 4); a torch function mode active during that module's forward sees each call, and
records the expert's own tokens: a over the tokens routed to expert e, psi over their output
gradients. An expert that gets no token in an update records zeros, as an unused layer does.
A per-expert checkpoint tensor (Mixtral, Qwen-MoE) has statistics of its own; a stored 3-D
stack (model/experts.py) has its experts' statistics laid end to end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..model.anatomy import Weight
from ..model.experts import BATCHED, is_stack


def _reduce(t: torch.Tensor, rms: bool) -> torch.Tensor:
    t = t.detach().float()
    dims = tuple(range(t.dim() - 1))
    return t.pow(2).mean(dims).sqrt() if rms else t.abs().mean(dims)


class StatsRecorder:
    """Hooks that turn the inputs and output gradients of scored weights into psi and a.

    `attach(weights, model)` installs the hooks (returns handles to remove); every forward
    of a hooked module records a; every backward draw through it records one psi draw;
    `finish_update(weights)` closes one update (probe batch) for those weights. Results:
    `psi[key]`, `a[key]`: lists of float32 vectors on the CPU, one per update.
    """

    def __init__(self, estimator: str, method: str):
        self.estimator, self.method = estimator, method
        self.psi: dict[str, list[torch.Tensor]] = {}
        self.a: dict[str, list[torch.Tensor]] = {}
        self._draws: dict[str, list[torch.Tensor]] = {}
        self._act: dict[str, torch.Tensor] = {}
        self.unit_activation: set[str] = set()  # boundary rule: projector weights use a = 1
        self.sizes: dict[str, tuple[int, int]] = {}  # key -> (out, in); a stack: (experts * out, experts * in)
        self.experts: dict[str, int] = {}  # stack key -> number of experts
        self._stack_act: dict[str, dict[int, torch.Tensor]] = {}  # stack key -> expert -> a
        self._stack_draws: dict[str, dict[int, list[torch.Tensor]]] = {}  # stack key -> expert -> psi draws

    def attach(self, weights: list[Weight], model) -> list:
        handles = []
        by_module: dict[str, list[Weight]] = {}
        for w in weights:
            by_module.setdefault(w.module, []).append(w)
        for path, group in by_module.items():
            module = model.get_submodule(path)
            if group[0].expert is None and not is_stack(group[0]) and not _own_forward(module):
                handles.append(module.register_forward_hook(self._linear_hook(group)))
            else:
                tracer = _ExpertTracer(self, group, model)
                handles.append(module.register_forward_pre_hook(tracer.start))
                handles.append(module.register_forward_hook(tracer.stop))
        return handles

    def _linear_hook(self, group: list[Weight]):
        def hook(module, inputs, output):
            self.record(group, inputs[0], output)

        return hook

    def record(self, group: list[Weight], inputs: torch.Tensor, output: torch.Tensor, rows=None) -> None:
        """Record one forward of weights sharing an input: a from `inputs`, psi later from the
        gradient of `output` (columns `rows[key]` of it for weights fused into one output)."""
        a = _reduce(inputs, self.method == "wanda")
        for w in group:
            self._act[w.key] = a
        if output.requires_grad and self.method != "wanda":
            output.register_hook(self._grad_hook(group, rows))

    def record_expert(self, w: Weight, expert: int, inputs: torch.Tensor, output: torch.Tensor) -> None:
        """Record one expert of a stored 3-D stack `w`: a from the tokens routed to it (`inputs`), psi
        later from the gradient of its `output`."""
        self._stack_act.setdefault(w.key, {})[expert] = _reduce(inputs, self.method == "wanda")
        if output.requires_grad and self.method != "wanda":
            draws = self._stack_draws.setdefault(w.key, {}).setdefault(expert, [])
            output.register_hook(lambda g: draws.append(self._per_output(g)))

    def record_batched(self, w: Weight, inputs: torch.Tensor, output: torch.Tensor) -> None:
        """Record every expert of a stored 3-D stack `w` multiplied at once, output = bmm(inputs, W),
        inputs (experts, tokens, in) (Llama 4: every expert gets every token, scaled by its routing
        weight, which is 0 for a token not routed to it): each expert's a and psi over its own rows,
        the nonzero ones."""
        routed = inputs.detach().ne(0).any(-1)  # (experts, tokens)
        experts = [e for e in range(inputs.shape[0]) if bool(routed[e].any())]
        acts = self._stack_act.setdefault(w.key, {})
        for e in experts:
            acts[e] = _reduce(inputs[e][routed[e]], self.method == "wanda")
        if output.requires_grad and self.method != "wanda":
            draws = self._stack_draws.setdefault(w.key, {})

            def hook(g):  # one psi draw per expert, from its own rows of the output gradient
                for e in experts:
                    draws.setdefault(e, []).append(self._per_output(g[e][routed[e]]))

            output.register_hook(hook)

    def _per_output(self, g: torch.Tensor) -> torch.Tensor:
        g = g.detach().float()
        dims = tuple(range(g.dim() - 1))
        return g.pow(2).mean(dims) if self.estimator == "hutchinson" else g.abs().mean(dims)

    def _grad_hook(self, group: list[Weight], rows):
        def hook(g):
            per = self._per_output(g)
            for w in group:
                lo, hi = rows[w.key] if rows else (0, per.numel())
                self._draws.setdefault(w.key, []).append(per[lo:hi])

        return hook

    def finish_update(self, weights: list[Weight]) -> None:
        """Close one update (probe batch): average the draws, store psi_u and a_u."""
        for w in weights:
            out_f, in_f = self.sizes[w.key]
            if is_stack(w):
                self._finish_stack(w, out_f, in_f)
                continue
            draws = self._draws.pop(w.key, None)
            if self.method == "wanda":
                psi = torch.ones(out_f)
            elif draws is None:  # no gradient reached it (an expert no token was routed to)
                psi = torch.zeros(out_f)
            else:
                psi = torch.stack(draws).mean(0)
                if self.estimator == "hutchinson":
                    psi = psi.sqrt()
            a = self._act.pop(w.key, None)
            a = torch.zeros(in_f) if a is None else a
            if w.key in self.unit_activation:
                a = torch.ones_like(a)
            self.psi.setdefault(w.key, []).append(psi.cpu())
            self.a.setdefault(w.key, []).append(a.cpu())

    def _finish_stack(self, w: Weight, out_f: int, in_f: int) -> None:
        """One update of a stack: each expert's psi (mean over its draws) and a, end to end; zeros for
        an expert no token reached."""
        n = self.experts.get(w.key, 1)
        acts, draws = self._stack_act.pop(w.key, {}), self._stack_draws.pop(w.key, {})
        psi, a = torch.zeros(out_f), torch.zeros(in_f)
        o, i = out_f // n, in_f // n
        for e in range(n):
            if self.method == "wanda":
                psi[e * o:(e + 1) * o] = 1.0
            elif draws.get(e):
                p = torch.stack(draws[e]).mean(0)
                psi[e * o:(e + 1) * o] = p.sqrt() if self.estimator == "hutchinson" else p
            if e in acts:
                a[e * i:(e + 1) * i] = acts[e].cpu()
        self.psi.setdefault(w.key, []).append(psi)
        self.a.setdefault(w.key, []).append(a)


class _ExpertTracer(TorchFunctionMode):
    """Active during one experts module's forward: each `F.linear(x, param[e])` on a scored
    3-D parameter is recorded for the per-expert weights that slice (param, e); during the forward
    of a Linear with a forward of its own, its `F.linear(x, weight)`."""

    def __init__(self, recorder: StatsRecorder, group: list[Weight], model):
        super().__init__()
        self.recorder = recorder
        self.params = {}
        self.by_slice: dict[tuple[int, int], list[Weight]] = {}
        self.stacks: dict[int, Weight] = {}  # id(parameter) -> its stored 3-D stack
        for w in group:
            p = model.get_parameter(w.param)
            self.params[id(p)] = p
            if is_stack(w):
                self.stacks[id(p)] = w
                recorder.experts[w.key] = p.shape[0]
            else:
                self.by_slice.setdefault((id(p), w.expert), []).append(w)

    def start(self, module, args) -> None:  # forward pre-hook: must return None (keeps the args)
        self.__enter__()

    def stop(self, module, args, output) -> None:
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear or func in _MATMULS:  # x W[e]^T (out, in) or x @ W[e] (in, out)
            weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            if id(weight) in self.stacks and weight.dim() == 3 and args[0].dim() == 3:  # bmm over all experts
                self.recorder.record_batched(self.stacks[id(weight)], args[0], out)
                return out
            if id(weight) in self.params and (id(weight), None) in self.by_slice:  # a Linear with its own forward
                self.recorder.record(self.by_slice[(id(weight), None)], args[0], out)
                return out
            base = getattr(weight, "_base", None)
            if base is not None and id(base) in self.params and weight.dim() == 2:
                expert = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
                if id(base) in self.stacks:
                    self.recorder.record_expert(self.stacks[id(base)], expert, args[0], out)
                group = self.by_slice.get((id(base), expert))
                if group:
                    rows = {w.key: w.rows for w in group}
                    self.recorder.record(group, args[0], out, rows)
        return out


def _own_forward(module) -> bool:
    """An nn.Linear subclass with a forward of its own (Llama 4's router returns (scores, logits)): its
    `F.linear` call is recorded by the torch function mode, not by a hook on the module's output."""
    return isinstance(module, torch.nn.Linear) and type(module).forward is not torch.nn.Linear.forward


_MATMULS = BATCHED + (torch.mm, torch.Tensor.mm)  # x @ W[e], one expert at a time, or bmm over all of them
