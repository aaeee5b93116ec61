"""Which way a model class stores a linear weight: (out, in) as `torch.nn.Linear` does, or (in, out)
as transformers' `Conv1D` does (GPT-2 and its relatives).

An adapter's update must be added in the layout of the weight it updates (PEFT keeps
`fan_in_fan_out` per module); the model class is what knows it. Imports: `model.keys` (the
skeleton a `KeyRules` holds) and transformers' `Conv1D`.
"""

from __future__ import annotations

from torch import nn

from .keys import KeyRules


def stored_in_out(rules: KeyRules, canonical: str) -> bool | None:
    """Whether the weight with this canonical name is stored (in, out) (a `Conv1D`): True; (out, in) (an
    `nn.Linear`): False; None when the class is not known, has no such module, or it is neither."""
    model = rules.model
    if model is None:
        return None
    path, _, local = canonical.rpartition(".")
    if local != "weight":
        return None
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return True
    if isinstance(module, nn.Linear):
        return False
    return None
