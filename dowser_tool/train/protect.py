"""Keep protected weights fixed while someone else's training loop updates the rest.

`protect(model, mask)` installs two mechanisms (docs/TRAINING.md):
- a gradient hook per covered parameter zeroes the gradient of protected entries,
  so gradient clipping and optimizer statistics only ever see the trainable ones;
- after every optimizer step the protected entries are written back from a compact
  copy and their optimizer state (exp_avg, momentum_buffer, ...) is zeroed, because
  decoupled weight decay and momentum from earlier steps move weights whose gradient
  is zero.

On a PEFT LoRA model the adapted weights get a row/column factorised mask instead
(see `_lora_guards`); the guarantee is then about the effective weight the model
computes with, `base + scale * B @ A`, and inits that rewrite the base layer are
refused. A module PEFT trains as a whole copy (`modules_to_save`) is protected in
that copy. Optimizer state is handled by what each entry means (`_Guard.reset_state`).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import DowserError
from ..io.layout import fingerprint_agrees
from ..model.keys import FINGERPRINTS_CHECKED, KeyRules, composite_prefix, match_names, peft_fold
from ..repair.lora import init_moves_base
from ..score import validate_ratio
from ..sidecar.file import Sidecar

# Per-entry optimizer state, by the names optimizers give it (torch.optim, transformers' Adafactor,
# schedulefree, bitsandbytes). Gradient statistics of a protected entry are zeroed: its gradient is
# zero from now on. Parameter sequences (schedule-free's z, x, y; ASGD's average ax) are other copies
# of the weight, from which `optimizer.eval()` or the user derive the weight they evaluate and save:
# their protected entries are set to the protected values. Any other state (8-bit quantized moments,
# step sizes, factored statistics) is left alone; the parameter itself is restored after every step.
GRADIENT_STATISTICS = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
                                 "acc_delta", "sum", "grad_avg", "exp_inf", "variance", "prev"})
PARAMETER_COPIES = frozenset({"z", "x", "y", "ax"})
# Packages whose optimizers' per-entry state names are the ones above (checked for each optimizer).
KNOWN_OPTIMIZER_PACKAGES = ("torch", "transformers", "schedulefree", "bitsandbytes")


@dataclass(eq=False)
class _Guard:
    """One parameter under protection: which entries, and what they must stay equal to."""

    name: str
    param: torch.nn.Parameter
    mask: torch.Tensor  # Bool, True = protected; wherever it was given until first needed elsewhere
    values: torch.Tensor | None  # the protected entries, in order (param dtype); None = all zero
    _on_device: dict = field(default_factory=dict)

    def __post_init__(self):
        self.mask = _shard_of(self.param, self.mask)  # a DTensor (FSDP2) parameter: this rank's part

    @classmethod
    def keep(cls, name, param, mask):
        guard = cls(name, param, mask, None)
        guard.values = _local(param.detach())[guard.mask_on(param.device)]  # boolean indexing copies
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
    def mask_sharded_grad(self, param) -> None:
        # FSDP2 writes the reduce-scattered gradient of a sharded parameter itself (no autograd hook
        # fires), then calls the parameter's post-accumulate-grad hooks: mask this rank's shard there.
        _local(param.grad).masked_fill_(self.mask_on(param.grad.device), 0)

    @torch.no_grad()
    def restore(self) -> None:
        p = _local(self.param)
        mask = self.mask_on(p.device)
        if self.values is None:
            p.masked_fill_(mask, 0)
        else:
            if self.values.device != p.device or self.values.dtype != p.dtype:
                self.values = self.values.to(p.device, p.dtype)  # the model moved after protect(): follow once
            p.masked_scatter_(mask, self.values)

    @torch.no_grad()
    def reset_state(self, state: dict) -> None:
        """Make a protected entry's optimizer state agree with a weight that never moves: gradient
        statistics zeroed, parameter copies set to the protected values (GRADIENT_STATISTICS,
        PARAMETER_COPIES); other state, and state not shaped like the parameter (step counters,
        Adafactor's row/column factors), is left alone."""
        for key, value in state.items():
            value = _local(value) if torch.is_tensor(value) else value
            if not torch.is_tensor(value) or value.shape != _local(self.param).shape:
                continue
            mask = self.mask_on(value.device)
            if key in GRADIENT_STATISTICS or (key in PARAMETER_COPIES and self.values is None):
                value.masked_fill_(mask, 0)
            elif key in PARAMETER_COPIES:
                value.masked_scatter_(mask, self.values.to(value.device, value.dtype))

    def changed(self) -> bool:
        now = _local(self.param.detach())[self.mask_on(self.param.device)]
        before = torch.zeros_like(now) if self.values is None else self.values.to(now.device, now.dtype)
        return not torch.equal(_bits(now), _bits(before))


class _EffectiveWeight:
    """The protected entries of a LoRA-adapted weight as the model computes with it,
    base + sum over adapters of scale * B @ A (added in the weight's dtype, as merge_and_unload
    does), remembered as a digest at protect time: `changed()` recomputes it."""

    def __init__(self, name: str, module, axes: "LoraAxes"):
        self.name, self.module = name, module
        self.outside = ~axes.submatrix()  # where every adapter's delta must stay exactly zero
        self.digest = self._digest()

    @torch.no_grad()
    def _digest(self) -> str:
        weight = self.module.base_layer.weight
        effective = weight.detach().clone()
        for adapter in self.module.lora_A:
            A, B = self.module.lora_A[adapter].weight, self.module.lora_B[adapter].weight
            delta = (B.detach().float() @ A.detach().float()) * self.module.scaling[adapter]
            effective += delta.to(effective.dtype)
        protected = _bits(effective[self.outside.to(effective.device)]).contiguous().cpu()
        return hashlib.sha256(protected.numpy().tobytes()).hexdigest()

    def changed(self) -> bool:
        return self._digest() != self.digest


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
        self._effective: list[_EffectiveWeight] = []
        self._checked: set[int] = set()
        self._hooks = [g.param.register_post_accumulate_grad_hook(g.mask_sharded_grad) if _is_dtensor(g.param)
                       else g.param.register_hook(g.mask_grad) for g in guards if g.param.requires_grad]
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
        check_optimizer(optimizer)
        for p, guard in self._stepped(optimizer):
            guard.reset_state(optimizer.state.get(p, {}))

    def enforce(self, optimizer=None) -> None:
        """Write protected entries back and zero their optimizer state. Runs after every step
        on its own; call it yourself only for an optimizer whose step bypasses torch's hooks."""
        if optimizer is None:
            for guard in self._guards:
                guard.restore()
        else:
            optimizer = torch_optimizer(optimizer)
            stepped = list(self._stepped(optimizer))
            if stepped and id(optimizer) not in self._checked:  # (an optimizer of other parameters is not ours)
                check_optimizer(optimizer)
                self._checked.add(id(optimizer))
            for p, guard in stepped:
                guard.restore()
                guard.reset_state(optimizer.state.get(p, {}))
        self.steps += 1

    def changed(self) -> list[str]:
        """Names of covered parameters whose protected entries differ (bitwise) from protect time;
        for a LoRA-adapted weight, the protected entries of its effective weight base + scale * B @ A
        (`[]` is the check)."""
        moved = {g.name for g in self._guards if g.changed()}
        return sorted(moved | {e.name for e in self._effective if e.changed()})

    def remove(self) -> None:
        """Remove every hook; parameters keep their current values (LoRA entries stay zero)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def check_optimizer(optimizer) -> None:
    """Refuse an optimizer of an unknown package that keeps the weight it evaluates outside the
    parameter (a schedule-free style `eval()`/`train()` switch): its state could hold a copy of the
    weight that the rules above do not know, and `eval()` would move protected entries."""
    package = type(optimizer).__module__.split(".")[0]
    if package not in KNOWN_OPTIMIZER_PACKAGES and callable(getattr(optimizer, "eval", None)):
        raise DowserError(
            f"{type(optimizer).__module__}.{type(optimizer).__name__}: an optimizer with its own eval()/train() "
            "keeps weights outside the parameters in state protect() does not know; supported: torch.optim, "
            "transformers' Adafactor, schedulefree and bitsandbytes optimizers"
        )


def torch_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's AcceleratedOptimizer,
    which delegate step() to `.optimizer`: torch's step hooks fire on the inner one."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class _MaskSource:
    """A sidecar (masks, maybe statistics) or a plain dict of masks, behind one interface."""

    def __init__(self, mask_or_path, revision: str | None = None):
        if revision is not None and isinstance(mask_or_path, (dict, Sidecar)):
            raise DowserError("revision= applies to a sidecar path or Hub reference, not to a Sidecar or dict")
        if isinstance(mask_or_path, dict):
            self.sidecar = None
            self._masks = mask_or_path
            self.names = list(mask_or_path)
        else:
            self.sidecar = mask_or_path if isinstance(mask_or_path, Sidecar) else Sidecar(os.fspath(mask_or_path), revision)
            self.names = self.sidecar.names
        self.has_stats = self.sidecar is not None and self.sidecar.has_stats
        self.roles = self.sidecar.roles if self.sidecar is not None else {}

    def mask(self, name: str) -> torch.Tensor:
        if self.sidecar is None:
            return torch.as_tensor(self._masks[name]).to(torch.bool)
        return self.sidecar.mask(name)

    def score(self, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        return self.sidecar.score(name, base_weight)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sidecar.shapes[name]) if self.sidecar is not None else tuple(self._masks[name].shape)


def protect(model: torch.nn.Module, mask_or_path, *, update_ratio: float | None = None, optimizer=None,
            lora_axis_fraction: float | None = None, revision: str | None = None) -> ProtectHandle:
    """Keep every protected entry of `model` bit-identical to its value now, through any
    number of optimizer steps.

    mask_or_path: a sidecar path, a Hub reference `REPO_ID` / `REPO_ID/FILE` (at `revision`;
    `sidecar.resolve_sidecar`), a `Sidecar`, or a dict {name: Bool tensor, True = protected};
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
    source = _MaskSource(mask_or_path, revision)
    if update_ratio is not None and not source.has_stats:
        raise DowserError(f"cannot re-cut at update ratio {update_ratio}: the mask holds no score statistics")
    params = dict(model.named_parameters(remove_duplicate=False))
    _refuse_sharded(params)
    targets, fused = _targets(source, params, model)
    lora_modules = _lora_modules(model)
    cover = _Coverage()
    for param_name, parts in fused.items():  # per-expert masks of one fused 3-D expert parameter
        param = params[param_name]
        if param.requires_grad:
            cover.keep(param_name, param, _fused_mask(source, parts, param, update_ratio))
    for mask_name, param_name in targets:
        param = params[param_name]
        if param_name in lora_modules:
            module_name, module = lora_modules[param_name]
            _refuse_moved_base(model, module_name, module)
            cover.adapt(param_name, param, module_name, module,
                        _lora_axes(source, mask_name, param, update_ratio, lora_axis_fraction))
        elif param.requires_grad:
            cover.keep(param_name, param, _entrywise_mask(source, mask_name, param, update_ratio))
        # else: frozen and not adapted, nothing trains it
    return cover.handle(optimizer)


@dataclass
class _Coverage:
    """What `protect` guards, gathered parameter by parameter: the guards, the parameters covered,
    the trainable and protected entry counts, and the LoRA axes of each adapted module."""

    guards: list = field(default_factory=list)
    covered: list = field(default_factory=list)
    counts: list = field(default_factory=lambda: [0, 0])  # trainable, protected
    axes: dict = field(default_factory=dict)
    effective: list = field(default_factory=list)  # (parameter, LoRA module, axes) per adapted weight

    def keep(self, param_name: str, param, mask: torch.Tensor) -> None:
        """Guard a plain (or fused expert) parameter entry by entry."""
        self.guards.append(_Guard.keep(param_name, param, mask))
        self.covered.append(param_name)
        trainable = int((~mask).sum())
        self.counts[0] += trainable
        self.counts[1] += mask.numel() - trainable

    def adapt(self, param_name: str, param, module_name: str, module, lora: LoraAxes) -> None:
        """Guard a LoRA-adapted weight through its adapter's B rows and A columns."""
        self.guards += _lora_guards(module_name, module, lora)
        self.effective.append((param_name, module, lora))
        self.axes[module_name] = lora
        self.covered.append(param_name)
        trainable = int(lora.rows.sum()) * int(lora.cols.sum())
        self.counts[0] += trainable
        self.counts[1] += param.numel() - trainable

    def handle(self, optimizer) -> ProtectHandle:
        """Zero the LoRA factors' protected rows and columns now, and hand back the installed guards."""
        for guard in self.guards:
            if guard.values is None:
                guard.restore()  # LoRA: zero the protected rows of B and columns of A now
        handle = ProtectHandle(self.guards, optimizer)
        handle._effective = [_EffectiveWeight(name, module, lora) for name, module, lora in self.effective]
        handle.names = sorted(self.covered)
        handle.trainable, handle.protected = self.counts
        handle.lora = self.axes
        return handle


def _targets(source: _MaskSource, params: dict, model):
    """(mask name, parameter name) pairs: each mask on the parameter(s) that play its tensor's part;
    and {parameter: [(mask name, expert, rows)]} for per-expert masks of fused 3-D expert parameters.

    Names are folded through PEFT's renaming and the family's layouts (`anatomy.KeyRules`, from the
    model's transformers class). A mask with a role (output head, input embedding) goes to the parameter
    that plays the role in this model (`KeyRules.roles`), wherever the sidecar stored it. A
    module PEFT trains as a copy (`modules_to_save`) is protected in every adapter's copy; the frozen
    original beside it is left alone. A sidecar probed on a composite (a VLM, NVILA) reaches its language
    model loaded alone, dense masks and expert masks alike (`_composite`).
    """
    folded: dict[str, list[str]] = {}
    for name in params:
        plain, copy = peft_fold(name)
        if copy != "original_module":
            folded.setdefault(plain, []).append(name)
    rules = KeyRules.of_model(model)
    roles = rules.roles(folded) if rules.known and source.roles else None  # unknown family: by name only
    by_role = {n: roles.of(r) for n, r in source.roles.items()} if roles else {}
    matched, missing = match_names([n for n in source.names if by_role.get(n) is None], folded, rules)
    matched.update({n: plain for n, plain in by_role.items() if plain is not None})
    fused: dict[str, list] = {}
    if missing:  # per-expert masks (Mixtral / Qwen-MoE checkpoints) of experts fused into 3-D parameters
        placed = _place_experts(rules, {n: source.shape(n) for n in missing}, folded, fused)
        missing = [n for n in missing if n not in placed]
    if missing and source.sidecar is not None and rules.known:
        missing = _composite(source, rules, folded, params, missing, matched, fused)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise DowserError(f"mask entries match no parameter of the model: {shown}")
    pairs = [(mask_name, param) for mask_name in source.names if mask_name in matched
             for param in folded[matched[mask_name]]]
    return pairs, fused


def _place_experts(rules: KeyRules, shapes: dict, folded: dict, fused: dict, mask_of: dict | None = None) -> set:
    """Add per-expert masks ({name in this model's checkpoint layout: shape}) to `fused` ({parameter:
    [(mask name, expert, rows)]}) for the 3-D expert parameters loading fuses them into; `mask_of` maps a
    layout name to its sidecar name (default: the same). Returns the layout names placed."""
    placed = set()
    for key, (param, expert, rows) in rules.expert_placement(shapes).items():
        for target in folded.get(param, []):
            fused.setdefault(target, []).append(((mask_of or {}).get(key, key), expert, rows))
            placed.add(key)
    return placed


def _composite(source: _MaskSource, rules: KeyRules, folded: dict, params: dict, missing: list,
               matched: dict, fused: dict) -> list[str]:
    """Map the masks of a sidecar probed on a composite checkpoint (a VLM's `model.language_model.*`,
    NVILA's `llm.*`) onto its language model loaded alone, expert masks included: the composite's prefix
    P becomes the model's Q (`keys.composite_prefix`), and each renamed mask then goes where a checkpoint of
    the model alone would load it (a parameter, or an expert's rows of a fused 3-D parameter).
    Refuses (`_check_composite`) when a mapped tensor's shape or recorded fingerprint disagrees.
    Adds to `matched` and `fused`; returns the names still unmatched."""
    pair = composite_prefix(missing, {rules.canonical(n) for n in folded}, rules)
    if pair is None:
        return missing
    p, q = pair
    layout = {}  # sidecar name -> its name in a checkpoint of the model alone
    for name in missing:
        key = next((k for k in (peft_fold(name)[0], rules.canonical(name)) if k.startswith(p)), None)
        if key is not None:
            layout[name] = q + key[len(p):]
    back = {v: k for k, v in layout.items()}
    direct, rest = match_names(list(back), folded, rules)
    dense = {back[k]: plain for k, plain in direct.items()}
    experts: dict[str, list] = {}
    placed = _place_experts(rules, {k: source.shape(back[k]) for k in rest}, folded, experts, back)
    _check_composite(source, p, {n: (folded[plain][0], params[folded[plain][0]]) for n, plain in dense.items()},
                     {t: (params[t], parts) for t, parts in experts.items()})
    matched.update(dense)
    for target, parts in experts.items():
        fused.setdefault(target, []).extend(parts)
    done = set(dense) | {back[k] for k in placed}
    return [n for n in missing if n not in done]


def _check_composite(source: _MaskSource, p: str, dense: dict, experts: dict) -> None:
    """Refuse, in one line, a composite mapping onto tensors other than those the masks were probed on:
    a shape that differs (`_composite_views`), or a weight whose fingerprint, where the sidecar records one,
    differs (up to FINGERPRINTS_CHECKED dense weights and as many expert tensors: stacks, slices). `dense`:
    {mask name: (parameter name, parameter)}; `experts`: {parameter name: (parameter, [(mask name, expert, rows)])}."""
    where = f"the mask was probed on a model holding this one under {p!r}"
    counts = {"dense": 0, "expert": 0}
    for name, kind, weight, what in _composite_views(source, where, dense, experts):
        expected = source.sidecar.fingerprint(name)
        if expected is None or counts[kind] >= FINGERPRINTS_CHECKED or weight is None or weight.device.type == "meta":
            continue  # no fingerprint recorded, enough checked, or a shard / placeholder: nothing whole here
        counts[kind] += 1
        if not fingerprint_agrees(weight, expected):
            raise DowserError(f"{where} ({name!r}), but {what} is not the weight it was probed on (its fingerprint "
                              f"differs in {weight.dtype} and every storage dtype): another model, or loaded in a "
                              "narrower dtype than it is stored in")


def _composite_views(source: _MaskSource, where: str, dense: dict, experts: dict) -> list[tuple]:
    """(mask name, "dense" or "expert", the model's tensor as the mask stores it (None for a sharded parameter),
    what it is) for every mapped mask; DowserError when a shape disagrees: a dense parameter neither of the
    mask's shape nor its transposed 3-D stack, an expert slice of another shape, or per-expert masks that do
    not make up the fused parameter (every expert, every row)."""
    views = []
    for name, (param_name, param) in dense.items():
        shape, flip = source.shape(name), _stored_transposed(source.shape(name), param)
        if shape != tuple(param.shape) and not flip:
            raise DowserError(f"{where}, but {name!r} has shape {list(shape)} in the mask and {param_name!r} "
                              f"{list(param.shape)} in this model")
        weight = None if _is_dtensor(param) else param.detach()
        views.append((name, "expert" if param.dim() == 3 else "dense",  # a 3-D expert stack counts as experts
                      weight.transpose(1, 2) if flip and weight is not None else weight, repr(param_name)))
    for param_name, (param, parts) in experts.items():
        made = (len({e for _, e, _ in parts}), max(r1 for _, _, (_, r1) in parts))
        if param.dim() != 3 or made != tuple(param.shape[:2]):
            raise DowserError(f"{where}, but its per-expert masks of {param_name!r} make {made[0]} experts of "
                              f"{made[1]} rows, and this model's parameter has shape {list(param.shape)}")
        for name, e, (r0, r1) in parts:
            if (r1 - r0, *param.shape[2:]) != source.shape(name):
                raise DowserError(f"{where}, but {name!r} has shape {list(source.shape(name))} in the mask and "
                                  f"expert {e} rows {r0}:{r1} of {param_name!r} {[r1 - r0, *param.shape[2:]]} here")
            views.append((name, "expert", None if _is_dtensor(param) else param.detach()[e, r0:r1],
                          f"expert {e} rows {r0}:{r1} of {param_name!r}"))
    return views


def _fused_mask(source: _MaskSource, parts, param, update_ratio) -> torch.Tensor:
    """One Bool mask for a fused (experts, rows, in) parameter from its per-expert masks (entries no
    mask covers stay trainable); with update_ratio, each slice re-cut against its slice of `param`."""
    mask = torch.zeros(param.shape, dtype=torch.bool)
    for name, expert, (r0, r1) in parts:
        base = _full(param.detach())[expert, r0:r1].cpu()
        if tuple(base.shape) != source.shape(name):
            raise DowserError(f"{name!r} has shape {list(source.shape(name))} in the mask but its slice of "
                              f"the model's fused expert parameter has {list(base.shape)}")
        mask[expert, r0:r1] = source.mask(name) if update_ratio is None else source.sidecar.recut(name, base, update_ratio)
    return mask


def _refuse_moved_base(model, module_name: str, module) -> None:
    """Refuse LoRA inits that rewrote the base layer (PiSSA, OLoRA, ...): zeroing B's protected rows
    and A's protected columns would then take part of the pretrained weight out of the effective one."""
    configs = getattr(model, "peft_config", None) or {}
    for adapter in module.lora_A:
        init = getattr(configs.get(adapter), "init_lora_weights", True)
        if init_moves_base(init):
            raise DowserError(
                f"{module_name}: adapter {adapter!r} was initialised with init_lora_weights={init!r}, which rewrites "
                "the base layer to a residual; protect() keeps protected entries of the effective weight at their "
                "pretrained values only for inits that leave the base layer alone (True, 'gaussian', 'eva', "
                "'orthogonal', 'mica'). Train with one of those, or repair afterwards with dowser merge"
            )


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


def _refuse_sharded(params: dict) -> None:
    """DTensor parameters (FSDP2 `fully_shard`) are masked shard by shard; DeepSpeed ZeRO-3 partitions
    (`ds_id`/`ds_status`) and FSDP1 flat parameters are refused: no tested path."""
    for name, p in params.items():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            raise DowserError(f"parameter {name!r} is sharded by DeepSpeed ZeRO-3, which protect() does not support: "
                              "use ZeRO-1/2, FSDP2 (fully_shard), DDP, or the sparse adapter (sparse_adapter)")
        if "_fsdp_wrapped_module" in name or "_flat_param" in name:
            raise DowserError(f"parameter {name!r} is sharded by FSDP1 (a flat parameter); protect() needs FSDP2 (fully_shard), "
                              "DDP, or no sharding")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def _local(t):
    """This rank's shard of a DTensor (parameter, gradient, optimizer state) as a plain tensor sharing its
    storage; any other tensor as it is."""
    if not _is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def _full(t):
    """A DTensor gathered whole (every rank calls this together); any other tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_of(param, mask: torch.Tensor) -> torch.Tensor:
    """The part of a whole-parameter mask that this rank holds of a DTensor parameter (split as the
    parameter is, without communication); the mask itself for any other parameter."""
    if not _is_dtensor(param) or mask.shape != param.shape:
        return mask
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(mask.to(param.device), param.device_mesh, param.placements, src_data_rank=None).to_local()
    if local.shape != _local(param).shape:
        raise DowserError(f"cannot split the mask of a sharded parameter of shape {list(param.shape)} as it is split")
    return local.cpu() if mask.device.type == "cpu" else local


def _check_shape(name: str, mask_shape, param: torch.Tensor) -> None:
    if tuple(mask_shape) == tuple(param.shape):
        return
    hint = " (an empty placeholder: is the model sharded by DeepSpeed ZeRO-3?)" if param.numel() == 0 else ""
    raise DowserError(f"{name!r} has shape {list(mask_shape)} in the mask but {list(param.shape)} in the model{hint}")


def _entrywise_mask(source: _MaskSource, name: str, param, update_ratio) -> torch.Tensor:
    if _stored_transposed(source.shape(name), param):  # a 3-D expert stack the loading converter transposes
        weight = _full(param.detach()).transpose(1, 2)
        mask = source.mask(name) if update_ratio is None else source.sidecar.recut(name, weight, update_ratio)
        return mask.transpose(1, 2).contiguous()
    if update_ratio is None:
        mask = source.mask(name)
        _check_shape(name, mask.shape, param)
        return mask
    _check_shape(name, source.sidecar.shapes[name], param)
    return source.sidecar.recut(name, _full(param.detach()), update_ratio)


def _stored_transposed(shape, param) -> bool:
    """Whether a mask of a 3-D expert stack is stored (experts, in, out) for a parameter the model holds
    (experts, out, in): transformers' loading converter transposes it (Qwen3-VL-MoE, model/experts.py)."""
    shape = tuple(shape)
    return len(shape) == 3 and param.dim() == 3 and shape != tuple(param.shape) and \
        (shape[0], shape[2], shape[1]) == tuple(param.shape)


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
