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
converter is a plain transpose of the last two dimensions. A stack whose module declares nothing,
or whose converter does anything else, is not scored (`stack_layout` None): the probe lists it.
"""

from __future__ import annotations

from torch import nn


def stack_layout(module: nn.Module, converter, stored_shape, param_shape) -> bool | None:
    """Whether each expert slice of a 3-D parameter of experts module `module` is stored (in, out)
    (True) or (out, in) (False); None when that cannot be known. `converter`: the weight converter
    transformers loads it through (None: stored as the model holds it); a `Transpose` of the last two
    dimensions flips the layout when it transposes (with `check_dims`, transformers transposes only a
    stored shape that differs from the parameter's)."""
    declared = getattr(module, "is_transposed", None)
    if not isinstance(declared, bool):
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
