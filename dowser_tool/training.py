"""Keep protected weights fixed while someone else's training loop updates the rest.

`protect(model, mask)` installs two mechanisms (docs/TRAINING.md):
- a gradient hook per covered parameter zeroes the gradient of protected entries,
  so gradient clipping and optimizer statistics only ever see the trainable ones;
- after every optimizer step the protected entries are written back from a compact
  copy and their optimizer state (exp_avg, momentum_buffer, ...) is zeroed, because
  decoupled weight decay and momentum from earlier steps move weights whose gradient
  is zero.

On a PEFT LoRA model the adapted weights get a row/column factorised mask instead
(see `_lora_guards`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import DowserError
from .names import architecture_for, match_names
from .scoring import score_matrix, validate_ratio
from .sidecar import Sidecar


@dataclass(eq=False)
class _Guard:
    """One parameter under protection: which entries, and what they must stay equal to."""

    name: str
    param: torch.nn.Parameter
    mask: torch.Tensor  # Bool, True = protected; wherever it was given until first needed elsewhere
    values: torch.Tensor | None  # the protected entries, in order (param dtype); None = all zero
    _on_device: dict = field(default_factory=dict)

    @classmethod
    def keep(cls, name, param, mask):
        guard = cls(name, param, mask, None)
        guard.values = param.detach()[guard.mask_on(param.device)]  # boolean indexing copies
        return guard

    def mask_on(self, device) -> torch.Tensor:
        # Masks arrive on the CPU (from the sidecar); each device gets its own copy once.
        device = torch.device(device)
        if self.mask.device == device:
            return self.mask
        if device not in self._on_device:
            self._on_device[device] = self.mask.to(device)
        return self._on_device[device]

    def mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self.mask_on(grad.device), 0)

    @torch.no_grad()
    def restore(self) -> None:
        p = self.param
        mask = self.mask_on(p.device)
        if self.values is None:
            p.masked_fill_(mask, 0)
        else:
            if self.values.device != p.device or self.values.dtype != p.dtype:
                self.values = self.values.to(p.device, p.dtype)  # the model moved after protect(): follow once
            p.masked_scatter_(mask, self.values)

    @torch.no_grad()
    def zero_state(self, state: dict) -> None:
        # Only per-entry state has the parameter's shape; `step` counters and factored
        # (row/column) statistics such as Adafactor's are left alone.
        for value in state.values():
            if torch.is_tensor(value) and value.shape == self.param.shape:
                value.masked_fill_(self.mask_on(value.device), 0)

    def changed(self) -> bool:
        now = self.param.detach()[self.mask_on(self.param.device)]
        before = torch.zeros_like(now) if self.values is None else self.values.to(now.device, now.dtype)
        return not torch.equal(_bits(now), _bits(before))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that -0.0 != 0.0 and NaN == NaN compare as stored."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


@dataclass(frozen=True)
class LoraAxes:
    """The trainable rows (out) and columns (in) of one LoRA-adapted weight, as Bool vectors."""

    rows: torch.Tensor
    cols: torch.Tensor

    def submatrix(self) -> torch.Tensor:
        """Bool (out, in): where the merged delta B @ A may be nonzero."""
        return self.rows[:, None] & self.cols[None, :]


class ProtectHandle:
    """Returned by `protect`: keeps the hooks alive; `remove()` takes them all off again.

    Attributes: `names` (model parameter names of the covered weights), `trainable` and
    `protected` (entry counts over the covered weights; for a LoRA-adapted weight the
    entries its merged delta can reach), `lora` (module name -> LoraAxes) and `steps`
    (optimizer steps enforced so far).
    """

    def __init__(self, guards: list[_Guard], optimizer=None):
        self._guards = guards
        self._by_param: dict[int, list[_Guard]] = {}
        for g in guards:
            self._by_param.setdefault(id(g.param), []).append(g)
        self.names: list[str] = []
        self.trainable = 0
        self.protected = 0
        self.lora: dict[str, LoraAxes] = {}
        self.steps = 0
        self._hooks = [g.param.register_hook(g.mask_grad) for g in guards if g.param.requires_grad]
        if optimizer is None:
            # No optimizer named: watch every optimizer; each restores only the parameters it holds.
            self._hooks.append(register_optimizer_step_post_hook(self._after_step))
        else:
            optimizer = torch_optimizer(optimizer)
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))
            self._zero_state(optimizer)  # momentum gathered before protect() must not leak in

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.enforce(optimizer)

    def _stepped(self, optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                yield from ((p, g) for g in self._by_param.get(id(p), ()))

    def _zero_state(self, optimizer) -> None:
        for p, guard in self._stepped(optimizer):
            guard.zero_state(optimizer.state.get(p, {}))

    def enforce(self, optimizer=None) -> None:
        """Write protected entries back and zero their optimizer state. Runs after every step
        on its own; call it yourself only for an optimizer whose step bypasses torch's hooks."""
        if optimizer is None:
            for guard in self._guards:
                guard.restore()
        else:
            optimizer = torch_optimizer(optimizer)
            for p, guard in self._stepped(optimizer):
                guard.restore()
                guard.zero_state(optimizer.state.get(p, {}))
        self.steps += 1

    def changed(self) -> list[str]:
        """Names of covered parameters whose protected entries differ (bitwise) from protect time."""
        return sorted({g.name for g in self._guards if g.changed()})

    def remove(self) -> None:
        """Remove every hook; parameters keep their current values (LoRA entries stay zero)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def torch_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's AcceleratedOptimizer,
    which delegate step() to `.optimizer`: torch's step hooks fire on the inner one."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class _MaskSource:
    """A sidecar (masks, maybe statistics) or a plain dict of masks, behind one interface."""

    def __init__(self, mask_or_path):
        if isinstance(mask_or_path, dict):
            self.sidecar = None
            self._masks = mask_or_path
            self.names = list(mask_or_path)
        else:
            self.sidecar = mask_or_path if isinstance(mask_or_path, Sidecar) else Sidecar(os.fspath(mask_or_path))
            self.names = self.sidecar.names
        self.has_stats = self.sidecar is not None and self.sidecar.has_stats

    def mask(self, name: str) -> torch.Tensor:
        if self.sidecar is None:
            return torch.as_tensor(self._masks[name]).to(torch.bool)
        return self.sidecar.mask(name)

    def score(self, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        psi, a, w = self.sidecar.stats(name)
        return score_matrix(base_weight, psi, a, w)


def protect(model: torch.nn.Module, mask_or_path, *, update_ratio: float | None = None, optimizer=None,
            lora_axis_fraction: float | None = None) -> ProtectHandle:
    """Keep every protected entry of `model` bit-identical to its value now, through any
    number of optimizer steps.

    mask_or_path: a sidecar path, a `Sidecar`, or a dict {name: Bool tensor, True = protected};
    names may be checkpoint names or the model's own parameter names. update_ratio: re-cut
    the masks at this ratio from the sidecar's statistics, using the model's weights now as
    the base. optimizer: watch only this optimizer (and zero its existing state for protected
    entries now); by default every torch optimizer is watched. lora_axis_fraction: for
    LoRA-adapted weights, the fraction of rows and of columns left trainable (default
    sqrt(update ratio), so that the trainable block covers about the update ratio).
    """
    if update_ratio is not None:
        update_ratio = validate_ratio(update_ratio)
    if lora_axis_fraction is not None:
        lora_axis_fraction = validate_ratio(lora_axis_fraction, "lora_axis_fraction")
    model = _unwrap(model)
    source = _MaskSource(mask_or_path)
    if update_ratio is not None and not source.has_stats:
        raise DowserError(f"cannot re-cut at update ratio {update_ratio}: the mask holds no score statistics")
    params = dict(model.named_parameters(remove_duplicate=False))
    _refuse_sharded(params)
    matched, missing = match_names(source.names, params, _architecture(model))
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise DowserError(f"mask entries match no parameter of the model: {shown}")
    lora_modules = _lora_modules(model)
    guards, counts, axes, covered = [], [0, 0], {}, []
    for mask_name, param_name in matched.items():
        param = params[param_name]
        if param_name in lora_modules:
            module_name, module = lora_modules[param_name]
            lora = _lora_axes(source, mask_name, param, update_ratio, lora_axis_fraction)
            guards += _lora_guards(module_name, module, lora)
            axes[module_name] = lora
            trainable = int(lora.rows.sum()) * int(lora.cols.sum())
        elif param.requires_grad:
            mask = _entrywise_mask(source, mask_name, param, update_ratio)
            guards.append(_Guard.keep(param_name, param, mask))
            trainable = int((~mask).sum())
        else:
            continue  # frozen and not adapted: nothing trains it
        covered.append(param_name)
        counts[0] += trainable
        counts[1] += param.numel() - trainable
    for guard in guards:
        if guard.values is None:
            guard.restore()  # LoRA: zero the protected rows of B and columns of A now
    handle = ProtectHandle(guards, optimizer)
    handle.names = sorted(covered)
    handle.trainable, handle.protected = counts
    handle.lora = axes
    return handle


def _unwrap(model):
    """The model inside DDP / DataParallel (`.module`) or torch.compile (`._orig_mod`): same
    parameters, without the wrapper's name prefix."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _architecture(model):
    # A PEFT model's config is its base model's; the name folding needs the base architecture.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        return None
    try:
        return architecture_for(config.to_dict())
    except DowserError:
        return None  # a family names.py does not know: match the model's own names


def _refuse_sharded(params: dict) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        DTensor = ()
    for name, p in params.items():
        if isinstance(p, DTensor) or hasattr(p, "ds_id") or "_fsdp_wrapped_module" in name or "_flat_param" in name:
            raise DowserError(
                f"parameter {name!r} is sharded (FSDP or DeepSpeed ZeRO-3); protect() needs whole parameters: "
                "use DDP, DeepSpeed ZeRO-1/2, or no sharding"
            )


def _check_shape(name: str, mask_shape, param: torch.Tensor) -> None:
    if tuple(mask_shape) == tuple(param.shape):
        return
    hint = " (an empty placeholder: is the model sharded by DeepSpeed ZeRO-3?)" if param.numel() == 0 else ""
    raise DowserError(f"{name!r} has shape {list(mask_shape)} in the mask but {list(param.shape)} in the model{hint}")


def _entrywise_mask(source: _MaskSource, name: str, param, update_ratio) -> torch.Tensor:
    if update_ratio is None:
        mask = source.mask(name)
        _check_shape(name, mask.shape, param)
        return mask
    _check_shape(name, source.sidecar.shapes[name], param)
    return source.sidecar.recut(name, param.detach(), update_ratio)


def _lora_modules(model) -> dict[str, tuple[str, torch.nn.Module]]:
    """base weight parameter name -> (module name, module) for every PEFT LoRA layer."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer"):
            out[f"{name}.base_layer.weight"] = (name, module)
    return out


def _lora_axes(source: _MaskSource, name: str, base_weight, update_ratio, axis_fraction) -> LoraAxes:
    """Rows and columns with the lowest summed score stay trainable.

    score: the Dowser score from saved statistics if any, else the entrywise mask itself
    (1 = protected), so rows/columns with the fewest protected entries win. Each axis keeps
    round(f * size) entries (at least 1), f = axis_fraction or sqrt(rho), rho = update_ratio
    or the entrywise mask's trainable fraction: f * f ~ rho of the matrix is trainable.
    """
    shape = source.sidecar.shapes[name] if source.sidecar else source.mask(name).shape
    _check_shape(name, shape, base_weight)
    score = source.score(name, base_weight) if source.has_stats else source.mask(name).float()
    if axis_fraction is None:
        rho = update_ratio if update_ratio is not None else 1.0 - source.mask(name).float().mean().item()
        axis_fraction = math.sqrt(rho)
    return LoraAxes(_lowest(score.sum(dim=1), axis_fraction), _lowest(score.sum(dim=0), axis_fraction))


def _lowest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool vector marking the round(fraction * n) (at least 1) lowest scores; ties to lower indices."""
    n = scores.numel()
    k = min(n, max(1, round(fraction * n)))
    order = torch.sort(torch.nan_to_num(scores.float(), nan=math.inf).cpu(), stable=True).indices
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order[:k]] = True
    return chosen


def _lora_guards(module_name: str, module, axes: LoraAxes) -> list[_Guard]:
    """Zero-valued guards on B's protected rows and A's protected columns, for every adapter:
    then B @ A, and so the merged delta, is exactly zero outside trainable rows x columns."""
    if getattr(module, "fan_in_fan_out", False):
        raise DowserError(f"{module_name}: LoRA with fan_in_fan_out (Conv1D weights) is not supported")
    guards = []
    for adapter in module.lora_A:
        if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
            raise DowserError(f"{module_name}: DoRA and LoRA bias change every entry of the merged weight; "
                              "use plain LoRA with protect()")
        A, B = module.lora_A[adapter], module.lora_B[adapter]
        if not (isinstance(A, torch.nn.Linear) and isinstance(B, torch.nn.Linear)):
            raise DowserError(f"{module_name}: only LoRA on Linear layers is supported")
        b_mask = (~axes.rows)[:, None].expand(B.weight.shape).clone()
        a_mask = (~axes.cols)[None, :].expand(A.weight.shape).clone()
        guards.append(_Guard(f"{module_name}.lora_B.{adapter}.weight", B.weight, b_mask, None))
        guards.append(_Guard(f"{module_name}.lora_A.{adapter}.weight", A.weight, a_mask, None))
    return guards
