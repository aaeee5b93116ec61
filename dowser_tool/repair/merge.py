"""`dowser merge`: repair a fine-tuned checkpoint from its base, tensor by tensor.

For every tensor a mask covers, protected entries come from BASE and the others
from the fine-tuned checkpoint (FT); every other tensor is FT's, unchanged. The
output keeps FT's shard layout (BASE's for a LoRA adapter) and is written
header-first, one tensor in memory at a time; shards that need no change are
copied byte for byte, and unchanged tensors inside rewritten shards are copied as
raw bytes, never decoded.

Repair strength: `restore` F protects the fraction F of each scored matrix with the
highest scores, re-cut from the sidecar's statistics and BASE's weights (restoring
the training mask, F = 0.9, undoes most of a fine-tune; docs/METHOD.md, "Post-hoc repair").

This module is the entry point (`merge_checkpoint`) and the options' parsing; the merge itself
comes in two parts: `repair.plan` (what each output tensor is made of, and every check that
can refuse: `MergePlan`) and `repair.write` (values, shards, index, files and the record:
`MergeWriter`). `merge_checkpoint(..., dry_run=True)` builds the plan alone and explains it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import DowserError
from ..io.outputs import check_destination
from ..sidecar.file import resolve_sidecar

# Re-exported: the names this module held before the plan and the writer were split out of it.
from .plan import DEFAULT_RESTORE, FLOAT_DTYPES, OUTPUT_DTYPES, Item, MergePlan, PlanListing, warn  # noqa: F401
from .write import REPAIR_RECORD, MergeSummary, MergeWriter  # noqa: F401

# The class that writes a planned merge, under its 0.1 name (tests patch `Merge._value`).
Merge = MergeWriter


def parse_fractions(text: str | None, what: str) -> list[float] | None:
    """'0.1,0.3' -> [0.1, 0.3]; each in [0, 1]."""
    if text is None or str(text).strip() == "":
        return None
    out = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise DowserError(f"{what} must be a number or a comma list of numbers, got {part.strip()!r}") from None
        if not 0.0 <= value <= 1.0:
            raise DowserError(f"{what} must be in [0, 1], got {value:g}")
        out.append(value)
    return out


def _restore_values(restore, update_ratio) -> list[float] | None:
    if restore is not None and update_ratio is not None:
        raise DowserError("pass --restore or --update-ratio, not both (--update-ratio R means --restore 1-R)")
    if isinstance(restore, str):
        restore = parse_fractions(restore, "--restore")
    if isinstance(update_ratio, str):
        update_ratio = parse_fractions(update_ratio, "--update-ratio")
    values = update_ratio if update_ratio is not None else restore
    if values is None:
        return None
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise DowserError(f"repair strength must be in [0, 1], got {v:g}")
    if update_ratio is not None:
        values = [round(1.0 - v, 10) for v in values]
    if len(set(values)) != len(values):
        raise DowserError("repair strengths repeat a value")
    return values


def _alpha_values(interpolate, restore, update_ratio) -> list[float]:
    if restore is not None or update_ratio is not None:
        raise DowserError("pass --interpolate or --restore/--update-ratio, not both")
    alphas = parse_fractions(interpolate, "--interpolate") if isinstance(interpolate, str) else (
        [float(a) for a in interpolate] if isinstance(interpolate, (list, tuple)) else [float(interpolate)])
    if any(not 0.0 <= a <= 1.0 for a in alphas) or len(set(alphas)) != len(alphas):
        raise DowserError("--interpolate takes distinct weights in [0, 1]")
    return alphas


def output_dirs(out, restore: list[float | None], prefix: str = "r") -> list[Path]:
    """One output per strength: OUT itself, or OUT-r0.1, OUT-r0.3, ... (OUT-a0.5, ... for --interpolate)."""
    out = Path(out)
    if len(restore) == 1:
        return [out]
    return [out.with_name(f"{out.name}-{prefix}{r:g}") for r in restore]


def merge_checkpoint(
    base,
    finetuned,
    mask,
    out,
    *,
    restore: float | Sequence[float] | str | None = None,
    update_ratio: float | Sequence[float] | str | None = None,
    interpolate: float | Sequence[float] | str | None = None,
    base_revision: str | None = None,
    finetuned_revision: str | None = None,
    shard_size: int | None = None,
    dtype: str = "keep",
    allow_pickle: bool = False,
    force: bool = False,
    progress: bool = True,
    mask_revision: str | None = None,
    dry_run: bool = False,
) -> list[MergeSummary] | list[PlanListing]:
    """Repair FT from BASE with a mask sidecar; write one checkpoint per repair strength.

    `restore` F (default DEFAULT_RESTORE, 0.1) protects the top-F fraction of each masked matrix by score;
    `update_ratio` R is the same as restore 1-R. Several values write OUT-r<F> folders.
    `interpolate` alpha instead writes BASE + alpha (FT - BASE) for every floating-point tensor both hold
    (WiSE-FT, Wortsman et al. 2022; task-vector scaling), OUT-a<alpha> for several; `mask` may then be None.
    `mask` may be a Hub reference (`REPO_ID` or `REPO_ID/FILE`, at `mask_revision`; see
    `sidecar.resolve_sidecar`). Returns one summary per output. Raises DowserError for any bad or
    disagreeing input. `dry_run` plans and checks everything but writes nothing: it returns one
    `PlanListing` per output instead (`.line()` lists each tensor as restored, copied, ... and the
    masks refused), having read only the BASE weights whose fingerprints the mask records.
    """
    if shard_size is not None and shard_size <= 0:
        raise DowserError(f"--shard-size must be positive, got {shard_size}")
    alphas = None
    if interpolate is not None:
        alphas = _alpha_values(interpolate, restore, update_ratio)
    elif mask is None:
        raise DowserError("--mask is required (only --interpolate works without one)")
    strengths = None if alphas else _restore_values(restore, update_ratio)
    mask = resolve_sidecar(mask, mask_revision) if mask is not None else None
    # Checked before any work; a sidecar without statistics allows one output only, so these stay right.
    names = output_dirs(out, alphas, "a") if alphas else output_dirs(out, strengths or [None])
    dests = [check_destination(d, force, inputs=[base, finetuned, mask]) for d in names]
    plan = MergePlan(base, finetuned, mask, base_revision=base_revision, finetuned_revision=finetuned_revision,
                     shard_size=shard_size, dtype=dtype, allow_pickle=allow_pickle, force=force)
    outputs = list(zip(dests, alphas)) if alphas else list(zip(dests, plan.strengths(strengths)))
    if dry_run:
        if plan.sidecar is not None and not alphas:  # interpolation restores no masked entries
            plan.check_fingerprints()
        return [plan.explain(dest, None, value) if alphas else plan.explain(dest, value) for dest, value in outputs]
    merge = MergeWriter(plan, progress=progress)
    if alphas:
        return [merge.write(dest, None, alpha) for dest, alpha in outputs]
    return [merge.write(dest, strength) for dest, strength in outputs]
