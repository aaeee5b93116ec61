"""`dowser inspect`: what a sidecar holds, as a table, JSON or a plot."""

from __future__ import annotations

import json
import math

from ..errors import DowserError
from .header import SidecarHeader


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
