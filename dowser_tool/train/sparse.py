"""The sidecar's trainable set as a standard PEFT sparse adapter (peft's Super-Tuning tuner).

`sparse_adapter(model, sidecar)` wraps `model` with peft's `SupertuningConfig` tuner
(arXiv 2607.09287) and replaces the entries peft chose (by weight magnitude) with the mask's
trainable entries (mask == 0), matrix by matrix. The result is an ordinary `PeftModel`: any
trainer that takes one trains it, `save_pretrained` writes the indices (int32) and values,
`PeftModel.from_pretrained(base, folder)` loads them back and `merge_and_unload()` adds the
values at those indices only, so every protected entry of the merged model is the base's, bit
for bit, by construction. A small JSON file beside the adapter (`ADAPTER_RECORD`) says which
sidecar and which base it was made from.

Entry counts: peft sizes every layer by one config value, `int(numel * (1 - sparsity))`,
also when it loads the adapter, while a mask has its own count per matrix (round(rho * numel)).
The sparsity is chosen so that peft's count equals every matrix's trainable count when one
value can (`choose_sparsity`); otherwise (e.g. tiny matrices whose round(rho * numel) round
differently, or masks cut at different ratios) at the smallest value where no matrix gets
fewer, and the few surplus slots of a matrix repeat some of its trainable indices with value
0 ("padding"). The set of indices is then still exactly the trainable set; a gradient hook
on the values keeps padding slots at 0 while this model trains (`dowser_padding_hooks`);
after a reload without that hook a padding slot trains as a second copy of an entry that is
trainable anyway, so protected entries are untouched either way. `merge_and_unload` sums
repeated indices (scatter_add). `dowser_record["padding"]` gives the slots per matrix.

Coverage: peft's tuner adapts `torch.nn.Linear` only. Masks on embeddings, transformers'
`Conv1D` (GPT-2) and fused 3-D expert parameters are not covered: those tensors stay frozen
(protected entirely) and a one-line warning names them; `adapter.dowser_record["uncovered"]`
lists them with the reason.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..errors import DowserError, reason
from ..io.outputs import atomic_dir, atomic_file, check_destination, file_sha256
from ..model.keys import peft_fold
from ..score import validate_ratio
from ..sidecar.file import Sidecar
from ..sidecar.summary import ADAPTER_RECORD, RECORD_FORMAT, RECORD_VERSION, read_adapter_record  # noqa: F401
from .protect import _MaskSource, _targets


def sparse_adapter(model: torch.nn.Module, sidecar, *, update_ratio: float | None = None, adapter_name: str = "default",
                   revision: str | None = None, base_revision: str | None = None):
    """A `peft.PeftModel` whose trainable entries are exactly the sidecar's trainable set.

    model: a transformers model (not yet PEFT-wrapped; it is wrapped in place, as `get_peft_model`
    does), in any floating dtype, on any device. sidecar: a sidecar path, a Hub reference
    `REPO_ID` / `REPO_ID/FILE` (at `revision`), a `Sidecar`, or a dict {name: Bool tensor of the
    weight's shape, True = protected} keyed by checkpoint or parameter names. update_ratio: re-cut
    every mask at this ratio from the sidecar's statistics against the model's weights now.
    base_revision: recorded as the base's revision (adapter_config.json `revision`).

    Each masked `nn.Linear` weight (out, in) becomes a peft Super-Tuning layer: a frozen base, an
    int32 buffer `supertuning_indices[adapter_name]` of the flat (row-major) positions of its
    trainable entries, ascending (then any padding), and a float32 parameter `supertuning_values[adapter_name]` of
    the same length, zero at start. The forward pass computes with W + scatter(values) and the
    merge adds the values (cast to W's dtype) at those positions only. A matrix whose mask protects
    every entry gets no layer. Every other parameter is frozen.

    Entry counts and coverage: see the module docstring. In short, every matrix's set of indices
    is exactly its trainable set (surplus slots peft's single `sparsity` imposes repeat trainable
    indices with value 0, kept at 0 by a gradient hook); masks on tensors that are not
    `nn.Linear` weights (embeddings, GPT-2 `Conv1D`, fused 3-D experts) stay frozen, with a
    one-line warning.

    Returns the PeftModel, with `dowser_record` (a dict: sidecar path and SHA-256, the sidecar's
    recorded base, the model's `name_or_path`, sparsity, counts, {peft module name: sidecar
    tensor name}); its `save_pretrained` also writes that record as `ADAPTER_RECORD` into the
    adapter's folder. Raises DowserError (one line) for a model already wrapped by PEFT, a peft
    without Super-Tuning, a bad ratio, mask names that match no parameter, mask shapes that differ
    from the model's, or a mask with no trainable entry anywhere.

    Sources: peft's `SupertuningConfig` / `SupertuningModel` (peft >= 0.21), Super-Tuning,
    arXiv 2607.09287; the mask is Model-Dowser's (docs/METHOD.md).
    """
    SupertuningConfig, get_peft_model = _peft()
    update_ratio, source = _checked_inputs(model, sidecar, update_ratio, adapter_name, revision)
    layers, uncovered = _layers(model, source)
    trainable, empty = _trainable(source, layers, update_ratio)
    sparsity, counts = choose_sparsity({m: (layers[m][1].numel(), idx.numel()) for m, idx in trainable.items()})
    padded = _pad_to_counts(trainable, counts)
    config = SupertuningConfig(target_modules=sorted(trainable), sparsity=sparsity, save_precomputed_indices=True,
                               init_weights=True, revision=base_revision)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _set_indices(peft_model, trainable, adapter_name)
    peft_model.dowser_padding_hooks = _zero_padding_grads(peft_model, padded, trainable, adapter_name)
    record = _record(peft_model, source.sidecar, layers, trainable, empty, uncovered, sparsity, padded, update_ratio,
                     base_revision)
    peft_model.dowser_record = record
    _record_on_save(peft_model, adapter_name, record)
    _warn(uncovered)
    return peft_model


def _checked_inputs(model, sidecar, update_ratio, adapter_name, revision):
    """(update ratio, the masks as protect reads them) after checking every argument."""
    if update_ratio is not None:
        update_ratio = validate_ratio(update_ratio)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise DowserError(f"adapter_name must be a non-empty name without dots, got {adapter_name!r}")
    if hasattr(model, "peft_config") or not isinstance(model, torch.nn.Module):
        raise DowserError("sparse_adapter() takes a plain transformers model, not a PEFT-wrapped one (or a non-model)")
    source = _mask_source(sidecar, revision)
    if update_ratio is not None and not source.has_stats:
        raise DowserError(f"cannot re-cut at update ratio {update_ratio}: the mask holds no score statistics")
    return update_ratio, source


def _trainable(source: _MaskSource, layers, update_ratio) -> tuple[dict, list]:
    """({module: flat indices of trainable entries, ascending}, [modules whose mask protects everything])."""
    trainable, empty = {}, []
    for module_name, (mask_name, weight) in layers.items():
        mask = _mask(source, mask_name, weight, update_ratio)
        idx = torch.nonzero(~mask.reshape(-1)).reshape(-1)
        if idx.numel():
            trainable[module_name] = idx
        else:
            empty.append(module_name)  # entirely protected: no layer, the weight stays frozen as it is
    if not trainable:
        raise DowserError("the mask leaves no trainable entry in any matrix the sparse adapter can cover")
    return trainable, empty


def _peft():
    try:
        from peft import SupertuningConfig, get_peft_model
    except ImportError:
        raise DowserError("sparse_adapter() needs peft >= 0.21 (SupertuningConfig): pip install 'peft>=0.21'") from None
    return SupertuningConfig, get_peft_model


def _peft_count(numel: int, sparsity: float) -> int:
    """peft's own entry count for one layer (SupertuningLayer._num_trainable)."""
    from peft.tuners.supertuning.layer import SupertuningLayer

    return SupertuningLayer._num_trainable(None, numel, sparsity)


def choose_sparsity(sizes: dict[str, tuple[int, int]]) -> tuple[float, dict[str, int]]:
    """For {layer: (numel, trainable count k)}: a peft `sparsity` and peft's count per layer at it,
    `int(numel * (1 - sparsity))` (peft's own formula). Every count is at least its k; all equal
    their k when one sparsity allows it, else the smallest sparsity-derived counts that are >= k."""
    lo = max(k / n for n, k in sizes.values())
    hi = min((k + 1) / n for n, k in sizes.values())

    def gaps(s):
        got = {m: _peft_count(n, s) for m, (n, _) in sizes.items()}
        return got, any(got[m] < k for m, (_, k) in sizes.items()), any(got[m] > k for m, (_, k) in sizes.items())

    if lo < hi:  # an exact fraction exists in real numbers: find a float sparsity peft's formula agrees with
        for fraction in ((lo + hi) / 2, lo, hi):
            s = min(max(1.0 - fraction, 0.0), math.nextafter(1.0, 0.0))
            for _ in range(64):
                got, low, high = gaps(s)
                if not low and not high:
                    return s, got
                if low == high:
                    break
                s = math.nextafter(s, -1.0 if low else 2.0)
    s = max(0.0, 1.0 - lo)
    while gaps(s)[1] and s > 0.0:  # no layer may get fewer slots than its trainable entries
        s = max(0.0, math.nextafter(s, -1.0))
    return s, gaps(s)[0]


def _pad_to_counts(trainable: dict, counts: dict) -> dict[str, int]:
    """Give each layer exactly peft's count of index slots: its trainable indices, then (where peft's
    count is larger) repeats of them as padding. Returns {layer: padding slots}."""
    padded = {}
    for m, idx in trainable.items():
        extra = counts[m] - idx.numel()
        if extra:
            trainable[m] = torch.cat([idx, idx.repeat(-(-extra // idx.numel()))[:extra]])
            padded[m] = extra
    return padded


def _zero_padding_grads(peft_model, padded: dict, trainable: dict, adapter_name: str) -> list:
    """Padding slots keep value 0: their gradient is zeroed (weight decay and momentum then leave 0 at 0)."""
    hooks = []
    for m, extra in padded.items():
        values = peft_model.get_base_model().get_submodule(m).supertuning_values[adapter_name]
        keep = trainable[m].numel() - extra

        def hook(grad, keep=keep):
            grad = grad.clone()
            grad[keep:] = 0
            return grad

        hooks.append(values.register_hook(hook))
    return hooks


def _mask_source(sidecar, revision) -> _MaskSource:
    """The masks as `protect` reads them (`protect._MaskSource`: a sidecar path, Hub reference or Sidecar,
    or a dict of masks, here made Bool tensors)."""
    if isinstance(sidecar, dict):
        sidecar = {n: torch.as_tensor(m).to(torch.bool) for n, m in sidecar.items()}
    elif not isinstance(sidecar, (str, os.PathLike, Sidecar)):
        raise DowserError(f"sidecar must be a path, Hub reference, Sidecar or dict, got {type(sidecar).__name__}")
    return _MaskSource(sidecar, revision)


def _mask(source: _MaskSource, name, weight, update_ratio) -> torch.Tensor:
    shape = source.shape(name)
    if shape != tuple(weight.shape):
        raise DowserError(f"{name!r} has shape {list(shape)} in the mask but {list(weight.shape)} in the model")
    if update_ratio is not None:
        return source.sidecar.recut(name, weight.detach().cpu(), update_ratio)
    return source.mask(name)


def _layers(model, source: _MaskSource) -> tuple[dict, dict]:
    """({module name: (mask name, weight)} for masks on nn.Linear weights, {mask name: reason} for the
    others). Names map as `protect` maps them (`protect._targets`: the family's key rules, roles to the
    module playing them, per-expert masks to fused 3-D parameters, a composite's prefix)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    pairs, fused = _targets(source, params, model)
    owners = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners[f"{module_name}.{local}" if module_name else local] = (module_name, module, local)
    layers, uncovered = {}, {n: "a fused 3-D expert parameter (peft's Super-Tuning adapts nn.Linear only)"
                             for parts in fused.values() for n, _, _ in parts}
    for mask_name, param in pairs:
        module_name, module, local = owners[param]
        if isinstance(module, torch.nn.Linear) and local == "weight":
            if module_name in layers:
                raise DowserError(f"masks {layers[module_name][0]!r} and {mask_name!r} both name {module_name!r}")
            layers[module_name] = (mask_name, module.weight)
        else:
            uncovered[mask_name] = f"{type(module).__name__}.{local} (peft's Super-Tuning adapts nn.Linear only)"
    return layers, uncovered


def _set_indices(peft_model, trainable: dict, adapter_name: str) -> None:
    """Put the mask's indices into each Super-Tuning layer (same length as peft's own choice)."""
    from peft.tuners.supertuning.layer import SupertuningLayer

    seen = set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, SupertuningLayer) or adapter_name not in module.supertuning_indices:
            continue
        plain = peft_fold(name)[0]
        idx = trainable.get(plain)
        old = module.supertuning_indices[adapter_name]
        if idx is None or idx.numel() != old.numel():
            raise DowserError(f"peft adapted {plain!r} unexpectedly (a module name that matches more than one module?)")
        module.supertuning_indices[adapter_name] = idx.to(device=old.device, dtype=torch.int32)
        seen.add(plain)
    if seen != set(trainable):
        raise DowserError(f"peft did not adapt {sorted(set(trainable) - seen)[:4]}")


def _record(peft_model, side, layers, trainable, empty, uncovered, sparsity, padded, update_ratio,
            base_revision) -> dict:
    base = peft_model.get_base_model()
    sidecar = None
    if side is not None:
        sidecar = {"path": str(Path(side.path).resolve()), "sha256": file_sha256(side.path),
                   "base_model": side.metadata.get("base_model"), "update_ratio": side.metadata.get("update_ratio")}
    counted = [m for m in layers if m in trainable or m in empty]
    n_train = sum(trainable[m].numel() - padded.get(m, 0) for m in trainable)
    return {
        "format": RECORD_FORMAT, "format_version": RECORD_VERSION, "tool_version": __version__,
        "peft_type": "SUPERTUNING", "sidecar": sidecar,
        "base_model": {"name_or_path": getattr(base, "name_or_path", None) or None, "revision": base_revision},
        "update_ratio": update_ratio, "sparsity": sparsity, "padding": dict(sorted(padded.items())),
        "trainable": n_train, "protected": sum(layers[m][1].numel() for m in counted) - n_train,
        "modules": {m: layers[m][0] for m in sorted(trainable)},
        "all_protected": {m: layers[m][0] for m in sorted(set(layers) - set(trainable))},
        "uncovered": dict(sorted(uncovered.items())),
    }


def write_adapter_record(folder, record: dict) -> Path:
    """Write `record` as `folder/ADAPTER_RECORD` (atomically, sorted keys)."""
    dest = Path(folder) / ADAPTER_RECORD
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return dest


def write_untrained_adapter(base: str, sidecar, out, *, update_ratio: float | None = None, revision: str | None = None,
                            sidecar_revision: str | None = None, force: bool = False) -> dict:
    """`dowser sparse-adapter`: load BASE (a folder or Hub id at `revision`) on the CPU in its stored dtype,
    with the class its config names (else AutoModelForCausalLM), build `sparse_adapter` from `sidecar`
    and write the untrained adapter folder `out` (adapter_config.json, adapter_model.safetensors,
    ADAPTER_RECORD) atomically: a failure leaves nothing. Returns the record."""
    dest = check_destination(out, force, inputs=[base, sidecar if isinstance(sidecar, (str, os.PathLike)) else None])
    side = sidecar if isinstance(sidecar, Sidecar) else Sidecar(os.fspath(sidecar), sidecar_revision)
    local = Path(base).expanduser()
    model = _load_base(str(local.resolve()) if local.is_dir() else base, revision)
    adapter = sparse_adapter(model, side, update_ratio=update_ratio, base_revision=revision)
    with atomic_dir(dest) as tmp:
        adapter.save_pretrained(tmp)
    return adapter.dowser_record


def _load_base(base: str, revision: str | None):
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base, revision=revision)
    except Exception as e:  # noqa: BLE001  (missing folder, no config.json, unknown model type, Hub errors)
        raise DowserError(f"{base}: cannot read its config ({reason(e, sentence=True)})") from None
    classes = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
    classes = [c for c in classes if c is not None and hasattr(c, "from_pretrained")]
    cls = classes[0] if classes else transformers.AutoModelForCausalLM
    try:
        return cls.from_pretrained(base, revision=revision, dtype="auto", device_map="cpu")
    except Exception as e:  # noqa: BLE001  (transformers' loading errors: one line, not a traceback)
        raise DowserError(f"{base}: cannot load as {cls.__name__} ({reason(e, sentence=True)})") from None


def _record_on_save(peft_model, adapter_name: str, record: dict) -> None:
    """Make this model's `save_pretrained` also write the record into the adapter's folder (peft puts an
    adapter other than "default" in a subfolder of its name), wherever it is called from (Trainer, ...)."""
    save = peft_model.save_pretrained
    signature = inspect.signature(save)

    @functools.wraps(save)
    def save_pretrained(save_directory, *args, **kwargs):
        result = save(save_directory, *args, **kwargs)
        bound = signature.bind(save_directory, *args, **kwargs).arguments
        selected = bound.get("selected_adapters") or list(peft_model.peft_config)
        if adapter_name in selected and bound.get("is_main_process", True):
            folder = Path(save_directory) / adapter_name if adapter_name != "default" else Path(save_directory)
            write_adapter_record(folder, record)
        return result

    peft_model.save_pretrained = save_pretrained


def _warn(uncovered: dict) -> None:
    if uncovered:
        shown = ", ".join(f"{n} ({r.split(' (')[0]})" for n, r in list(uncovered.items())[:4])
        more = f", ... ({len(uncovered)} in all)" if len(uncovered) > 4 else ""
        warnings.warn(f"sparse_adapter: {len(uncovered)} masked tensors stay frozen, peft's Super-Tuning adapts "
                      f"nn.Linear only: {shown}{more}", stacklevel=3)
