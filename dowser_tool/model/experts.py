"""Expert stacks: a mixture-of-experts block's experts kept in one 3-D parameter (experts, ., .) as the
checkpoint stores it (GPT-OSS, or any MoE transformers 5 saved fused) or as transformers' loading
converter makes it from one stored 3-D tensor (Qwen3-VL-MoE, whose converter transposes the
stored (experts, in, out) tensor).

Such a tensor is scored as it is stored: one mask of the stored shape, each expert's slice a matrix
of its own, scored from its own statistics (the tokens the router sends to that expert) and cut
with exactly round(rho * numel) trainable entries per slice (`score.score_matrix`, `score.cut_mask`).
Its statistics are the experts' psi and a laid end to end: psi (experts * out), a (experts * in).

Which of a slice's two dimensions is the input is what the experts module declares
(`is_transposed`, set by transformers' `use_experts_implementation` on every experts class that
supports grouped kernels: (in, out) when True, (out, in) otherwise), flipped when the loading
converter is a plain transpose of the last two dimensions. An experts module that declares nothing
(Llama 4's `Llama4TextExperts`, one `torch.bmm` over all experts) is traced once on the meta device
(`traced_layout`): a stack the module multiplies as the batched right operand of `bmm(x, W)`,
x (experts, tokens, in), is (in, out). A stack whose layout is still unknown, or whose converter
does anything else, is not scored (`stack_layout` None): the probe lists it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

BATCHED = (torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)  # products that batch 3-D operands


def stack_layout(module: nn.Module, converter, stored_shape, param_shape, name: str = "") -> bool | None:
    """Whether each expert slice of a 3-D parameter of experts module `module` is stored (in, out)
    (True) or (out, in) (False); None when that cannot be known. `converter`: the weight converter
    transformers loads it through (None: stored as the model holds it); a `Transpose` of the last two
    dimensions flips the layout when it transposes (with `check_dims`, transformers transposes only a
    stored shape that differs from the parameter's). `name`: the parameter's name in `module`, for a
    module that declares no layout (`traced_layout`)."""
    declared = getattr(module, "is_transposed", None)
    if not isinstance(declared, bool):
        declared = traced_layout(module, name) if name else None
    if declared is None:
        return None
    if converter is None:
        return declared if tuple(stored_shape) == tuple(param_shape) else None
    from transformers.core_model_loading import Transpose

    ops = list(getattr(converter, "operations", None) or [])
    if len(ops) != 1 or not isinstance(ops[0], Transpose) or sorted((ops[0].dim0 % 3, ops[0].dim1 % 3)) != [1, 2]:
        return None
    flips = not ops[0].check_dims or tuple(stored_shape) != tuple(param_shape)
    return (not declared) if flips else declared


def stack_shape(shape, transposed: bool) -> tuple[int, int, int]:
    """(experts, out, in) of a stored 3-D expert stack."""
    e, rows, cols = shape
    return (e, cols, rows) if transposed else (e, rows, cols)


def stacked_out_in(shape, transposed: bool) -> tuple[int, int]:
    """(experts * out, experts * in): the lengths of a stack's psi and a (its experts' end to end)."""
    e, out_f, in_f = stack_shape(shape, transposed)
    return e * out_f, e * in_f


def is_stack(w) -> bool:
    """Whether an `anatomy.Weight` is a stored 3-D expert stack (kind 'expert', no single expert)."""
    return w.kind == "expert" and w.expert is None


class _BatchedUse(TorchFunctionMode):
    """Records the 3-D parameters used as the right operand of a batched matmul, x (E, T, in) @ W (E, in, out)."""

    def __init__(self, params: dict[int, str]):
        super().__init__()
        self.params, self.right = params, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in BATCHED and len(args) == 2 and id(args[1]) in self.params and args[0].dim() == 3:
            if args[0].shape[0] == args[1].shape[0] and args[0].shape[2] == args[1].shape[1]:
                self.right.add(self.params[id(args[1])])
        return func(*args, **(kwargs or {}))


def traced_layout(module: nn.Module, name: str) -> bool | None:
    """True when an experts module that declares no layout multiplies its 3-D parameter `name` as
    `bmm(x, W)` over all experts at once, W (experts, in, out) (Llama 4); None otherwise.

    Runs the module's forward once on the meta device (no memory, no compute) with one token per
    expert, trying each width its 3-D parameters have as the input width; only a forward that takes
    one tensor can be traced."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    required = [p for p in params if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    stacks = {id(p): n for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    own = list(module.parameters(recurse=False))
    if len(required) != 1 or name not in stacks.values() or any(p.device.type != "meta" for p in own):
        return None
    experts = own[0].shape[0]
    for width in sorted({int(p.shape[d]) for p in own if p.dim() == 3 for d in (1, 2)}):
        use = _BatchedUse(stacks)
        try:
            with torch.no_grad(), use:
                module(torch.zeros(experts, width, device="meta"))
        except Exception:  # this width does not run: try the next; none runs: the layout is not known
            continue
        return True if name in use.right else None
    return None
