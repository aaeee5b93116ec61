"""A Hub model card (README.md) for a sidecar, so that uploading its folder gives a usable page.

The card is written with huggingface_hub's own `ModelCard` / `ModelCardData` (YAML metadata
block: `base_model`, `library_name`, `tags`; then Markdown), from what the sidecar records
about itself: base model and commit, method, estimator, settings, and how to use it. See
docs/HUB.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import __version__
from ..errors import DowserError
from ..io.outputs import atomic_file, check_destination
from ..sidecar.file import Sidecar

CARD_NAME = "README.md"
TAGS = ["dowser", "model-dowser", "importance-mask"]
# What the reader of the card replaces with the repository's id when none was given.
REPO_STAND_IN = "ORG/NAME"


def card_destination(sidecar_path: str | os.PathLike, force: bool = False) -> Path:
    """Where the card of a sidecar goes (README.md beside it), checked before any work: an
    existing README is never overwritten without `force` (DowserError)."""
    return check_destination(Path(sidecar_path).expanduser().absolute().parent / CARD_NAME, force)


def hub_model_id(model_id: str | None) -> str | None:
    """`model_id` if it names a Hub repo (not a local folder), else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not model_id or Path(model_id).is_absolute() or Path(model_id).expanduser().exists():
        return None
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return None
    return model_id


# The card's Markdown after its YAML block; `str.format` fields are filled by `model_card`.
CARD_BODY = """
# Dowser mask for {title}

`{file}` is a Model-Dowser mask sidecar for {base_text}{at}. For every scored weight
matrix it holds one bit per entry: set bits mark the entries that carry what the pretrained
model knows (protected), cleared bits the entries left free for fine-tuning. It is a plain
safetensors file (`mask/<tensor>` bit-packed masks{stats_part}
and JSON provenance in the header metadata), read by dowser-tool.

## How it was made

{table}

## Use
{stand_in}
Repair a model fine-tuned from the base without the mask; this {repair}:

```bash
dowser merge --base {base_arg}{pin} --finetuned ./my-finetune --mask {ref} --out ./my-finetune-repaired
```

Fine-tune with the mask: protected entries stay bit-identical through any optimizer.

```python
from dowser_tool import protect
handle = protect(model, "{ref}")        # the sidecar is downloaded into the HF cache

from dowser_tool import DowserCallback
trainer = Trainer(..., callbacks=[DowserCallback("{ref}")])    # Trainer, or TRL's SFTTrainer
```

Inspect it: `dowser inspect {ref}`. Pin a commit with `--mask-revision` (merge), `--revision`
(inspect, mask) or `revision=` (Python).
"""


def model_card(sidecar: Sidecar | str | os.PathLike, repo_id: str | None = None):
    """The card of a sidecar as a `huggingface_hub.ModelCard`.

    Metadata: `base_model` (when the base is a Hub repo), `library_name: dowser-tool`, `tags`
    (`dowser`, `model-dowser`, `importance-mask` and the method). Text: what the file is,
    the base model and commit, the settings it was made with, and the merge / protect /
    DowserCallback commands that use it, with `repo_id` (the repository the folder will be
    uploaded to; "ORG/NAME" when not given) as the sidecar reference.
    """
    from huggingface_hub import ModelCard, ModelCardData

    _check_repo_id(repo_id)
    sc = sidecar if isinstance(sidecar, Sidecar) else Sidecar(sidecar)
    meta = sc.metadata
    base = meta.get("base_model") or {}
    base_id, sha = base.get("id"), base.get("sha")
    hub_base = hub_model_id(base_id)
    method = meta.get("method") or "dowser"
    data = ModelCardData(base_model=hub_base, library_name="dowser-tool", tags=TAGS + [f"method-{method}"])
    ref = repo_id or REPO_STAND_IN
    body = CARD_BODY.format(
        title=hub_base or Path(base_id or "the base model").name,
        file=sc.path.name,
        base_text=f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{base_id or 'unknown'}`",
        at=f" at commit `{sha}`" if sha else "",
        stats_part=", score statistics" if sc.has_stats else "",
        table=_table(_settings(sc, method, base_id, sha)),
        stand_in="" if repo_id else f"\n`{REPO_STAND_IN}` stands for the id of the repository this card is in.\n",
        repair=("restores, from the base, the 10% of each masked matrix with the highest scores (`--restore 0.1`)"
                if sc.has_stats else "restores the entries this mask protects"),
        base_arg=hub_base or (base_id or "BASE"),
        pin=f" --base-revision {sha}" if sha and hub_base else "",
        ref=ref)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _check_repo_id(repo_id: str | None) -> None:
    """DowserError unless `repo_id` is None or a valid Hub repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            raise DowserError(f"{repo_id}: not a Hub repo id (expected ORG/NAME)") from None


def _settings(sc: Sidecar, method: str, base_id: str | None, sha: str | None) -> list[tuple[str, str]]:
    """The card's "How it was made" rows (setting, value), from what the sidecar records."""
    meta = sc.metadata
    total = protected = 0
    for name in sc.names:
        m = sc.mask(name)
        total += m.numel()
        protected += int(m.sum())
    rows = [("base model", f"{base_id or 'unknown'}" + (f" @ `{sha}`" if sha else "")),
            ("architecture", meta.get("architecture") or "?"),
            ("method", method),
            ("estimator", meta.get("estimator") or "none"),
            ("update ratio", f"{meta.get('update_ratio', '?')} (fraction of each matrix left trainable)"),
            ("decoder layers", _layers_text(meta.get("layers"))),
            ("also scored", ", ".join(meta.get("include") or []) or "nothing else")]
    probe = meta.get("probe")
    if isinstance(probe, dict):
        rows.append(("probes", ", ".join(f"{k} {v}" for k, v in sorted(probe.items()) if not isinstance(v, dict))))
    imported = meta.get("imported")
    if isinstance(imported, dict):
        rows.append(("imported from", f"{imported.get('format', '?')} ({imported.get('files', '?')} files)"))
    recut = ("full score matrices: masks can be re-cut at any ratio" if sc.has_scores else
             "saved: masks can be re-cut at any ratio" if sc.has_stats else "not saved: only this mask")
    rows += [("scores", recut),
             ("scored", f"{len(sc.names)} tensors, {total:,} weights, {protected / max(total, 1):.4f} protected"),
             ("written by", f"dowser-tool {meta.get('tool_version', __version__)}")]
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    """A two-column Markdown table of (setting, value) rows."""
    return "\n".join(["| setting | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def write_model_card(sidecar: str | os.PathLike, *, repo_id: str | None = None, force: bool = False) -> Path:
    """Write `model_card(sidecar)` as README.md beside the sidecar (atomically); an existing
    README is refused (DowserError) unless `force`. Returns the card's path."""
    sc = Sidecar(sidecar)
    dest = card_destination(sc.path, force)
    card = model_card(sc, repo_id)
    with atomic_file(dest) as tmp:
        card.save(tmp)
    return dest


def _layers_text(layers) -> str:
    if not isinstance(layers, list) or not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]} ({len(layers)})"
    return ", ".join(map(str, layers))
