"""`dowser inspect`: what a sidecar holds, as a table, JSON or a plot; and which sidecar and base
an adapter folder made from a sidecar (`dowser sparse-adapter`) came from.

The adapter's record, `ADAPTER_RECORD` beside its adapter_config.json, is defined here (written
by `train.sparse`, read by `dowser inspect`): a JSON object with `format` RECORD_FORMAT,
`format_version`, `tool_version`, `peft_type`, `sidecar` ({path, sha256, base_model,
update_ratio} or null), `base_model` ({name_or_path, revision}), `update_ratio`, `sparsity`,
`padding`, `trainable`, `protected`, `modules`, `all_protected`, `uncovered`. Torch-free.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DowserError
from ..io.outputs import file_sha256
from .header import SidecarHeader

ADAPTER_RECORD = "dowser_adapter.json"  # written beside adapter_config.json
RECORD_FORMAT = "dowser-sparse-adapter"
RECORD_VERSION = 1


def summarize(path) -> dict:
    """Provenance and one row per scored tensor (name, shape, protected fraction).

    Reads the header and counts the set bits of each packed mask: no torch, so `dowser inspect`
    starts at once. `path` is a local sidecar file (`resolve_sidecar` finds one)."""
    sc = SidecarHeader(path)
    rows = []
    total = protected = 0
    info = sc.metadata.get("tensor_info") or {}
    for name in sc.names:
        shape = sc.shapes[name]
        n, p = math.prod(shape), sc.protected_count(name)
        total += n
        protected += p
        t = info.get(name) or {}
        rows.append({"tensor": name, "shape": list(shape), "protected_fraction": p / n if n else 0.0,
                     "kind": t.get("kind"), "layer": t.get("layer")})
    meta = {k: v for k, v in sc.metadata.items() if k not in ("tensors", "tensor_info")}
    return {
        "path": str(sc.path),
        "metadata": meta,
        "has_stats": sc.has_stats,
        "tensors": rows,
        "scored_weights": total,
        "protected_fraction": protected / total if total else 0.0,
    }


def format_text(summary: dict) -> str:
    meta = summary["metadata"]
    base = meta.get("base_model") or {}
    lines = [
        f"sidecar      {summary['path']}",
        f"format       {meta.get('format')} v{meta.get('format_version')} (dowser-tool {meta.get('tool_version')})",
        f"base model   {base.get('id', '?')}" + (f" @ {base['sha']}" if base.get("sha") else ""),
        f"method       {meta.get('method', '?')} / estimator {meta.get('estimator', '?')}",
        f"update ratio {meta.get('update_ratio', '?')} (granularity {meta.get('granularity', 'entry')})",
    ]
    probe = meta.get("probe")
    if isinstance(probe, dict):
        lines.append("probes       " + ", ".join(f"{k}={v}" for k, v in sorted(probe.items())))
    lines.append(f"statistics   {'saved (re-cut at any ratio)' if summary['has_stats'] else 'not saved'}")
    lines.append(
        f"scored       {len(summary['tensors'])} tensors, {summary['scored_weights']:,} weights, "
        f"{summary['protected_fraction']:.4f} protected"
    )
    lines.append("")
    width = max([len(r["tensor"]) for r in summary["tensors"]] + [6])
    lines.append(f"{'tensor':<{width}}  {'kind':<10}  {'shape':>14}  protected")
    for r in summary["tensors"]:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['tensor']:<{width}}  {r['kind'] or '?':<10}  {shape:>14}  {r['protected_fraction']:.4f}")
    unscored = meta.get("unscored") or {}
    if unscored:
        lines.append("")
        lines.append(f"not scored   {len(unscored)} tensors")
        by_reason: dict[str, list[str]] = {}
        for name, reason in unscored.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
            lines.append(f"  {reason}: {shown}")
    return "\n".join(lines)


def format_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=True)


def plot(summary: dict, out_png) -> None:
    """Protected fraction by layer, one line per module type (needs the [plot] extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DowserError("--plot needs matplotlib: pip install 'dowser-tool[plot]'") from None
    series: dict[str, list[tuple[int, float]]] = {}
    for r in summary["tensors"]:  # layer and kind as the probe recorded them (tensor_info)
        layer = r["layer"] if isinstance(r["layer"], int) else -1
        series.setdefault(r["kind"] or "?", []).append((layer, r["protected_fraction"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
    ax.set_xlabel("decoder layer (-1: outside the decoder, or not recorded)")
    ax.set_ylabel("protected fraction")
    ax.set_title(summary["path"].split("/")[-1])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


# ---- adapter folders made from a sidecar ---------------------------------------------------
def read_adapter_record(folder) -> dict | None:
    """The record of an adapter folder made by `sparse_adapter` (None when the folder has none)."""
    path = Path(folder) / ADAPTER_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DowserError(f"{path}: unreadable ({e})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise DowserError(f"{path}: not a {RECORD_FORMAT} record")
    return record


def adapter_folder(path: Path) -> bool:
    """Whether `dowser inspect PATH` means an adapter folder: one with a record, or a PEFT adapter
    folder holding no sidecar file (a folder holding one sidecar names that sidecar)."""
    if not path.is_dir():
        return False
    if (path / ADAPTER_RECORD).is_file():
        return True
    return (path / "adapter_config.json").is_file() and not any(path.rglob("*.dowser.safetensors"))


def summarize_adapter(folder) -> dict:
    """An adapter folder made from a sidecar: its record, its adapter_config.json's essentials, and
    whether the recorded sidecar is still at its path with the recorded SHA-256 ("matches",
    "differs", "missing"). DowserError for a folder that is not such an adapter."""
    folder = Path(folder)
    record = read_adapter_record(folder)
    if record is None:
        what = "an adapter folder" if (folder / "adapter_config.json").is_file() else "a folder"
        raise DowserError(f"{folder}: {what} without {ADAPTER_RECORD}, so not made from a sidecar by dowser "
                          "sparse-adapter; dowser inspect reads sidecar files and the adapters made from them")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    sidecar = record.get("sidecar") if isinstance(record.get("sidecar"), dict) else None
    status = None
    if sidecar and sidecar.get("path"):
        path = Path(sidecar["path"])
        status = "missing" if not path.is_file() else "matches" if file_sha256(path) == sidecar.get("sha256") else "differs"
    keep = ("peft_type", "base_model_name_or_path", "revision", "sparsity", "target_modules")
    return {"path": str(folder), "kind": "sparse-adapter", "record": record, "sidecar_status": status,
            "adapter_config": {k: config.get(k) for k in keep if k in config}}


def format_adapter_text(summary: dict) -> str:
    record, config = summary["record"], summary["adapter_config"]
    side = record.get("sidecar") or {}
    base, side_base = record.get("base_model") or {}, side.get("base_model") or {}
    status = {"matches": "found, SHA-256 matches", "differs": "found, but its SHA-256 differs (changed since)",
              "missing": "not found at that path", None: "none recorded (masks given in memory)"}[summary["sidecar_status"]]
    lines = [
        f"adapter      {summary['path']} (peft {config.get('peft_type', record.get('peft_type'))} sparse adapter, "
        f"dowser-tool {record.get('tool_version')})",
        f"sidecar      {side.get('path', '-')}",
        f"sha256       {side.get('sha256', '-')} ({status})",
        f"base model   {base.get('name_or_path') or config.get('base_model_name_or_path') or '?'}"
        + (f" @ {base['revision']}" if base.get("revision") else ""),
        f"probed on    {side_base.get('id', '?')}" + (f" @ {side_base['sha']}" if side_base.get("sha") else ""),
        f"sparsity     {record.get('sparsity')} (update ratio {record.get('update_ratio') or side.get('update_ratio')})",
        f"entries      {record.get('trainable', 0):,} trainable, {record.get('protected', 0):,} protected, "
        f"{len(record.get('modules') or {})} adapted matrices",
    ]
    uncovered = record.get("uncovered") or {}
    if uncovered:
        shown = ", ".join(list(uncovered)[:3]) + (f", ... ({len(uncovered)} in all)" if len(uncovered) > 3 else "")
        lines.append(f"not covered  {len(uncovered)} masked tensors stay frozen: {shown}")
    return "\n".join(lines)
