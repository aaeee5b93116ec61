"""Aggregate rows over seeds; write RESULTS.md, results.json and the PNG plots."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("down", "up", "H")


def aggregate(rows: list[dict]) -> dict:
    """(kind, group, method, setting) -> {metric: (mean, std)} over seeds (std 0 for one seed)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kind"], r["group"], r["method"], r["setting"])].append(r)
    out = {}
    for key, rs in groups.items():
        keys = [k for k in rs[0] if k in METRICS or k.startswith("acc/")]
        out[key] = {k: (statistics.mean(r[k] for r in rs), statistics.pstdev(r[k] for r in rs) if len(rs) > 1 else 0.0)
                    for k in keys}
        out[key]["n"] = len(rs)
    return out


def _pm(ms) -> str:
    return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    # Method names such as `dowser x |FT-BASE|` hold pipes, which would split the cell.
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)


def _select(agg, kind, group, method=None):
    return {k: v for k, v in agg.items() if k[0] == kind and k[1] == group and (method is None or k[2] == method)}


def method_table(agg, kind, upstream) -> str:
    lines = []
    for key, v in {**_select(agg, kind, "zero-shot"), **_select(agg, kind, "train")}.items():
        lines.append([key[2], _pm(v["down"]), _pm(v["up"]), f"**{_pm(v['H'])}**",
                      *[f"{v[f'acc/{t}'][0]:.3f}" for t in upstream]])
    return _table(["method", "downstream", "upstream mean", "H", *upstream], lines)


def depth_table(agg, kind) -> str:
    lines = [[k[2], f"{k[3]:.2f}", _pm(v["down"]), _pm(v["up"]), _pm(v["H"])]
             for k, v in sorted(_depth(agg, kind).items(), key=lambda kv: (kv[0][2], kv[0][3]))]
    return _table(["method", "tuned fraction of layers", "downstream", "upstream mean", "H"], lines)


def _depth(agg, kind):
    # The 100% points are the full-depth training rows.
    full = {k: v for k, v in _select(agg, kind, "train").items() if k[2] in ("full-ft", "dowser-reference")}
    return {**_select(agg, kind, "depth"), **full}


def repair_table(agg, kind) -> str:
    rep = _select(agg, kind, "repair")
    methods = list(dict.fromkeys(k[2] for k in rep))
    fracs = sorted({k[3] for k in rep})
    lines = [[f"{F:g}", *[f"{rep[(kind, 'repair', m, F)]['H'][0]:.3f} ({rep[(kind, 'repair', m, F)]['down'][0]:.2f}/"
                          f"{rep[(kind, 'repair', m, F)]['up'][0]:.2f})" for m in methods]] for F in fracs]
    return _table(["restored fraction", *methods], lines)


def plots(agg, kind, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    train = {k[2]: v for k, v in {**_select(agg, kind, "zero-shot"), **_select(agg, kind, "train")}.items()}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = range(len(train))
    for i, m in enumerate(("H", "up", "down")):
        ax.bar([j + (i - 1) * 0.27 for j in x], [v[m][0] for v in train.values()], 0.27,
               yerr=[v[m][1] for v in train.values()], label={"H": "H", "up": "upstream", "down": "downstream"}[m])
    ax.set_xticks(list(x), list(train), rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05), ax.legend(fontsize=8), ax.set_title(f"{kind}: fine-tuning all decoder layers")
    names.append(_save(fig, out / f"{kind}_methods.png"))

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    depth = _depth(agg, kind)
    for method in ("full-ft", "dowser-reference"):
        pts = sorted((k[3], v["up"]) for k, v in depth.items() if k[2] == method)
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o", label=method)
    ax.set_xlabel("fraction of decoder layers tuned (last)"), ax.set_ylabel("upstream accuracy")
    ax.set_ylim(0, 1.05), ax.legend(fontsize=8), ax.set_title(f"{kind}: forgetting by depth")
    names.append(_save(fig, out / f"{kind}_depth.png"))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    rep = _select(agg, kind, "repair")
    for method in dict.fromkeys(k[2] for k in rep):
        pts = sorted((k[3], v["H"]) for k, v in rep.items() if k[2] == method)
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o", label=method)
    for method, style in (("full-ft", ":"), ("dowser-reference", "--")):
        if (kind, "train", method, 1.0) in agg:
            ax.axhline(agg[(kind, "train", method, 1.0)]["H"][0], ls=style, c="gray", label=f"{method} (trained)")
    ax.set_xlabel("restored fraction of each matrix"), ax.set_ylabel("H"), ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7), ax.set_title(f"{kind}: post-hoc repair of the full fine-tune")
    names.append(_save(fig, out / f"{kind}_repair.png"))
    return names


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def findings(agg, kind) -> list[str]:
    """Sentences computed from the numbers, so they stay true when the run changes."""
    train = {k[2]: v for k, v in _select(agg, kind, "train").items()}
    if not train:
        return []
    ranked = sorted(train, key=lambda m: -train[m]["H"][0])
    out = [f"Best H when training: {ranked[0]} ({_pm(train[ranked[0]]['H'])}); order: {', '.join(ranked)}."]
    rep = _select(agg, kind, "repair")
    for method in dict.fromkeys(k[2] for k in rep):
        best = max((k for k in rep if k[2] == method), key=lambda k: rep[k]["H"][0])
        out.append(f"Repair with {method}: best H {_pm(rep[best]['H'])} at restored fraction {best[3]:g}.")
    return out


def write(rows: list[dict], out: Path, *, command: str, seeds, wall: dict, settings: dict, upstream: dict,
          notes: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(command=command, seeds=seeds, wall=wall, settings=settings, upstream=upstream, notes=notes)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return render(rows, out, **meta)


def rerender(out: Path) -> Path:
    """RESULTS.md and plots again from results.json (e.g. after editing discussion.md)."""
    data = json.loads((out / "results.json").read_text())
    return render(data["rows"], out, **data["meta"])


def render(rows, out: Path, *, command, seeds, wall, settings, upstream, notes) -> Path:
    agg = aggregate(rows)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    md = ["# Forgetting benchmark: results", "",
          "Generated by the run; do not edit by hand (the discussion and investigations below come from "
          "`discussion.md` and `investigation-*.md`).", "",
          f"- Command: `{command}`", f"- Seeds (fine-tuning data order, probe seed, random masks): {list(seeds)}; "
          f"pretraining seed 0 (one pretrained model per kind, shared by all seeds)",
          f"- Measured wall time (2-core CPU shared with other jobs; 1 torch thread unless --threads): {', '.join(f'{k} {v:.0f} s' for k, v in wall.items())}",
          f"- Settings: `{json.dumps(settings)}`", *[f"- Note: {n}" for n in notes], "",
          "Metrics: exact-match accuracy on fixed held-out sets; upstream = mean over the upstream tasks; "
          "H = harmonic mean of downstream and upstream; mean ± std over seeds.", ""]
    for kind in kinds:
        md += [f"## {kind.upper()}", "", "### Fine-tuning all decoder layers (masks at update ratio 0.1)", "",
               method_table(agg, kind, upstream[kind]), "", "### Depth sweep", "", depth_table(agg, kind), "",
               "### Post-hoc repair of the full fine-tune: H (downstream/upstream) by restored fraction", "",
               repair_table(agg, kind), ""]
        md += [f"- {s}" for s in findings(agg, kind)] + [""]
        md += [f"![{p}]({p})" for p in plots(agg, kind, out)] + [""]
    here = Path(__file__).parent
    md += [p.read_text() for p in [here / "discussion.md", *sorted(here.glob("investigation-*.md"))] if p.exists()]
    path = out / "RESULTS.md"
    path.write_text("\n".join(md) + "\n")
    return path
