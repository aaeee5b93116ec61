"""`dowser inspect`: what a sidecar holds, as a table, JSON or a plot."""

from __future__ import annotations

import json

from .errors import DowserError
from .sidecar import Sidecar


def summarize(path) -> dict:
    """Provenance and one row per scored tensor (name, shape, protected fraction)."""
    sc = Sidecar(path)
    rows = []
    total = protected = 0
    for name in sc.names:
        m = sc.mask(name)
        n, p = m.numel(), int(m.sum())
        total += n
        protected += p
        rows.append({"tensor": name, "shape": list(m.shape), "protected_fraction": p / n if n else 0.0})
    meta = {k: v for k, v in sc.metadata.items() if k not in ("tensors",)}
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
    lines.append(f"{'tensor':<{width}}  {'shape':>14}  protected")
    for r in summary["tensors"]:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['tensor']:<{width}}  {shape:>14}  {r['protected_fraction']:.4f}")
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
    import re

    series: dict[str, list[tuple[int, float]]] = {}
    for r in summary["tensors"]:
        m = re.search(r"layers\.(\d+)\.", r["tensor"])
        kind = r["tensor"].split(".")[-2]
        layer = int(m.group(1)) if m else -1
        series.setdefault(kind, []).append((layer, r["protected_fraction"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
    ax.set_xlabel("decoder layer (-1: outside the decoder)")
    ax.set_ylabel("protected fraction")
    ax.set_title(summary["path"].split("/")[-1])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
