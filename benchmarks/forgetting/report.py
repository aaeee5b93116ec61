"""Aggregate rows over seeds; paired differences with 95% intervals; RESULTS.md, results.json, plots."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("down", "up", "H")
# Two-sided 95% quantiles of Student's t for 1-30 degrees of freedom (any statistics table).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96


def key(r: dict) -> tuple:
    return (r["kind"], r["group"], r["method"], r.get("depth"), r.get("setting"))


def aggregate(rows: list[dict]) -> dict:
    """key -> {metric: (mean, std), 'n': seeds, 'seeds': {seed: row}} (population std; 0 for one seed)."""
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    out = {}
    for k, rs in groups.items():
        names = [m for m in rs[0] if m in METRICS or m.startswith("acc/")]
        out[k] = {m: (statistics.mean(r[m] for r in rs), statistics.pstdev(r[m] for r in rs) if len(rs) > 1 else 0.0)
                  for m in names}
        out[k].update(n=len(rs), seeds={r["seed"]: r for r in rs}, strength=rs[0].get("strength"))
    return out


def paired(a: dict, b: dict, metric: str = "H") -> dict | None:
    """a - b over the seeds both have: mean, 95% t-interval, wins (a > b), losses, n."""
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    if not seeds:
        return None
    d = [a["seeds"][s][metric] - b["seeds"][s][metric] for s in seeds]
    mean = statistics.mean(d)
    half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return dict(mean=mean, lo=mean - half, hi=mean + half, wins=sum(x > 1e-12 for x in d),
                losses=sum(x < -1e-12 for x in d), n=len(d))


def fmt_paired(p: dict | None) -> str:
    if p is None:
        return "-"
    ci = "" if math.isnan(p["lo"]) else f" [{p['lo']:+.3f}, {p['hi']:+.3f}]"
    return f"{p['mean']:+.3f}{ci} {p['wins']}/{p['n']}"


def _pm(ms) -> str:
    return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def _cell(v: dict, extra: str = "") -> str:
    return f"{_pm(v['H'])} ({v['down'][0]:.2f}/{v['up'][0]:.2f}){extra}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)


def _select(agg, kind, group, method=None, depth=None):
    return {k: v for k, v in agg.items() if k[0] == kind and k[1] == group and (method is None or k[2] == method)
            and (depth is None or k[3] == depth)}


def depths_of(agg, kind) -> list[float]:
    return sorted({k[3] for k in agg if k[0] == kind and k[1] == "train"})


def best(agg, kind, family, depth):
    """The setting of a post-hoc family with the highest mean H at this depth: (key, value)."""
    cand = _select(agg, kind, "posthoc", family, depth)
    return max(cand.items(), key=lambda kv: kv[1]["H"][0]) if cand else (None, None)


def families(agg, kind) -> list[str]:
    return list(dict.fromkeys(k[2] for k in agg if k[0] == kind and k[1] == "posthoc"))


# ---- tables ------------------------------------------------------------
def training_table(agg, kind, depths) -> str:
    methods = list(dict.fromkeys(k[2] for k in _select(agg, kind, "train")))
    lines = []
    for z in _select(agg, kind, "zero-shot").values():
        lines.append(["pretrained", *[_cell(z) for _ in depths]])
    for m in methods:
        cells = []
        for d in depths:
            v = agg.get((kind, "train", m, d, None))
            cells.append(_cell(v, f" n={v['n']}") if v else "-")
        lines.append([m, *cells])
    return _table(["method", *[f"last {d:.0%} of layers" for d in depths]], lines)


def training_paired_table(agg, kind, depths) -> str:
    methods = list(dict.fromkeys(k[2] for k in _select(agg, kind, "train")))
    ours = [m for m in methods if m.startswith("dowser")]
    lines = []
    for o in ours:
        for m in methods:
            if m in ours:
                continue
            cells = [fmt_paired(paired(agg[(kind, "train", o, d, None)], agg[(kind, "train", m, d, None)]))
                     if (kind, "train", o, d, None) in agg and (kind, "train", m, d, None) in agg else "-"
                     for d in depths]
            lines.append([f"{o} − {m}", *cells])
    return _table(["H difference", *[f"last {d:.0%}" for d in depths]], lines)


def posthoc_best_table(agg, kind, depths) -> str:
    lines = []
    for fam in families(agg, kind):
        cells = []
        for d in depths:
            k, v = best(agg, kind, fam, d)
            cells.append(_cell(v, f" @ {k[4]}") if v else "-")
        lines.append([fam, *cells])
    return _table(["repair (best setting per depth)", *[f"last {d:.0%}" for d in depths]], lines)


def posthoc_all_table(agg, kind, depths) -> str:
    lines = []
    for fam in families(agg, kind):
        settings = list(dict.fromkeys(k[4] for k in _select(agg, kind, "posthoc", fam)))
        for s in settings:
            cells = [_cell(agg[(kind, "posthoc", fam, d, s)]) if (kind, "posthoc", fam, d, s) in agg else "-"
                     for d in depths]
            lines.append([fam, s, *cells])
    return _table(["repair", "setting", *[f"last {d:.0%}" for d in depths]], lines)


def dowser_repairs(agg, kind) -> list[str]:
    return [f for f in families(agg, kind) if f.startswith("dowser")]


def best_dowser(agg, kind, depth):
    """The best setting of any repair that uses the Dowser statistics, at this depth."""
    cands = [best(agg, kind, f, depth) for f in dowser_repairs(agg, kind)]
    cands = [c for c in cands if c[0] is not None]
    return max(cands, key=lambda kv: kv[1]["H"][0]) if cands else (None, None)


def posthoc_paired_table(agg, kind, depths) -> str:
    lines = []
    ours = {d: best_dowser(agg, kind, d) for d in depths}
    shipped = {d: best(agg, kind, "dowser --restore", d) for d in depths}
    lines.append(["best Dowser-statistics repair", *[f"{ours[d][0][2]} @ {ours[d][0][4]}" for d in depths]])
    for fam in families(agg, kind):
        if fam.startswith("dowser"):
            continue
        cells = [fmt_paired(paired(ours[d][1], best(agg, kind, fam, d)[1])) for d in depths]
        lines.append([f"best Dowser repair − best {fam}", *cells])
    for fam in ("interpolation", "ties", "dare"):
        if best(agg, kind, fam, depths[0])[0] is None:
            continue
        cells = [fmt_paired(paired(shipped[d][1], best(agg, kind, fam, d)[1])) for d in depths]
        lines.append([f"best `dowser --restore` − best {fam}", *cells])
    return _table(["H difference (paired over seeds)", *[f"last {d:.0%}" for d in depths]], lines)


def one_setting_table(agg, kinds) -> str:
    """Each family's single setting with the best mean H over every kind and depth: the evidence for a default."""
    cells = [(k, d) for k in kinds for d in depths_of(agg, k)]
    lines = []
    fams = list(dict.fromkeys(f for k in kinds for f in families(agg, k)))
    for fam in fams:
        settings = list(dict.fromkeys(key[4] for key in agg if key[1] == "posthoc" and key[2] == fam))
        scored = []
        for s in settings:
            vals = [agg.get((k, "posthoc", fam, d, s)) for k, d in cells]
            if all(vals):
                scored.append((statistics.mean(v["H"][0] for v in vals), s, vals))
        if not scored:
            continue
        mean, s, vals = max(scored)
        lines.append([fam, s, f"**{mean:.3f}**", *[f"{v['H'][0]:.3f}" for v in vals]])
    lines.sort(key=lambda line: -float(line[2].strip("*")))
    return _table(["repair", "setting", "mean H", *[f"{k} last {d:.0%}" for k, d in cells]], lines)


def criterion_table(agg, kinds) -> tuple[str, list[str]]:
    """Per repair family (each at its best setting per model and depth, as interpolation is): its H minus
    the best interpolation weight's, paired over seeds, in every cell; and the families that win everywhere."""
    cells = [(k, d) for k in kinds for d in depths_of(agg, k)]
    fams = [f for f in dict.fromkeys(f for k in kinds for f in families(agg, k)) if f != "interpolation"]
    lines, winners = [], []
    for fam in fams:
        row, wins_all = [], True
        for k, d in cells:
            (_, vf), (_, vi) = best(agg, k, fam, d), best(agg, k, "interpolation", d)
            if vf is None or vi is None:
                row.append("-")
                wins_all = False
                continue
            wins_all &= vf["H"][0] > vi["H"][0]
            row.append(fmt_paired(paired(vf, vi)))
        lines.append([fam, "yes" if wins_all else "no", *row])
        if wins_all:
            winners.append(fam)
    table = _table(["repair (best setting per cell) − best interpolation", "above it in every cell",
                    *[f"{k} last {d:.0%}" for k, d in cells]], lines)
    return table, winners


# ---- plots ---------------------------------------------------------------
def plots(agg, kind, out: Path, depths) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 3.6), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], depths):
        for fam in families(agg, kind):
            pts = sorted((v["strength"], v["H"]) for k, v in _select(agg, kind, "posthoc", fam, d).items())
            style = dict(lw=2.5, c="black", zorder=5) if fam == "interpolation" else dict(lw=1)
            ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o",
                        ms=3, label=fam, **style)
        for m, ls in (("dowser", "--"),):
            v = agg.get((kind, "train", m, d, None))
            if v:
                ax.axhline(v["H"][0], ls=ls, c="gray", label="dowser mask (trained)")
        ax.set_title(f"{kind}: last {d:.0%} of layers tuned"), ax.set_xlabel("repair strength (0 = FT, 1 = BASE)")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("H (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    names.append(_save(fig, out / f"{kind}_repair.png"))

    fig, ax = plt.subplots(figsize=(7, 3.4))
    methods = list(dict.fromkeys(k[2] for k in _select(agg, kind, "train")))
    width = 0.8 / len(depths)
    for i, d in enumerate(depths):
        vals = [agg.get((kind, "train", m, d, None)) for m in methods]
        ax.bar([j + (i - (len(depths) - 1) / 2) * width for j in range(len(methods))],
               [v["H"][0] if v else 0 for v in vals], width, yerr=[v["H"][1] if v else 0 for v in vals],
               label=f"last {d:.0%} of layers")
    ax.set_xticks(range(len(methods)), methods, rotation=15, fontsize=8)
    ax.set_ylabel("H"), ax.set_ylim(0, 1.05), ax.legend(fontsize=7), ax.set_title(f"{kind}: training with masks")
    names.append(_save(fig, out / f"{kind}_methods.png"))
    return names


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


# ---- sentences computed from the numbers ----------------------------------------
def findings(agg, kind, depths) -> list[str]:
    out = []
    for d in depths:
        ki, vi = best(agg, kind, "interpolation", d)
        ko, vo = best_dowser(agg, kind, d)
        kr, vr = best(agg, kind, "dowser --restore", d)
        if vi is None or vo is None:
            continue
        p = paired(vo, vi)
        verdict = "beats" if vo["H"][0] > vi["H"][0] else "does not beat"
        n_int = len(_select(agg, kind, "posthoc", "interpolation", d))
        n_our = sum(len(_select(agg, kind, "posthoc", f, d)) for f in dowser_repairs(agg, kind))
        out.append(f"last {d:.0%}: best interpolation (of {n_int} weights) {ki[4]} H {_pm(vi['H'])}; best "
                   f"Dowser-statistics repair (of {n_our} settings) {ko[2]} {ko[4]} H {_pm(vo['H'])} {verdict} it "
                   f"(paired {fmt_paired(p)}); "
                   f"`--restore` at its best ({kr[4]}) H {_pm(vr['H'])}.")
        train = {k[2]: v for k, v in _select(agg, kind, "train", depth=d).items()}
        if train:
            ranked = sorted(train, key=lambda m: -train[m]["H"][0])
            out.append(f"last {d:.0%}, masked training: " + ", ".join(f"{m} {train[m]['H'][0]:.3f}" for m in ranked)
                       + ".")
    return out


# ---- files ---------------------------------------------------------------
def write(rows: list[dict], out: Path, **meta) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=0) + "\n")
    return render(rows, out, **meta)


def rerender(out: Path) -> Path:
    """RESULTS.md and plots again from results.json (e.g. after editing discussion.md)."""
    data = json.loads((out / "results.json").read_text())
    return render(data["rows"], out, **data["meta"])


def from_partial(work: Path, out: Path, args) -> Path:
    """RESULTS.md from the rows an interrupted run saved after each seed (WORK/KIND/rows.json)."""
    from .run import KINDS, settings

    rows, notes, kinds = [], ["partial run: only the seeds finished before it stopped are reported"], []
    for kind in args.kinds.split(","):
        f = work / kind / "rows.json"
        if f.exists():
            data = json.loads(f.read_text())
            rows += data["rows"]
            notes += data["notes"]
            kinds.append(kind)
    seeds = sorted({r["seed"] for r in rows if r["group"] != "zero-shot"})
    return write(rows, out, command=f"python -m benchmarks.forgetting --work {work} (interrupted)", seeds=seeds,
                 wall={}, settings=settings(args.quick), upstream={k: list(KINDS[k]["up"]) for k in kinds}, notes=notes)


def render(rows, out: Path, *, command, seeds, wall, settings, upstream, notes) -> Path:
    agg = aggregate(rows)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    md = ["# Forgetting benchmark: results", "",
          "Generated by the run; do not edit by hand (the discussion below comes from `discussion.md`).", "",
          f"- Command: `{command}`",
          f"- Seeds (fine-tuning data order, probe seed, random masks, DARE's drops): {list(seeds)}; pretraining "
          "seed 0 (one pretrained model per kind, shared by all seeds)",
          "- Measured wall time (2-core CPU shared with other jobs; 1 torch thread per process): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()),
          f"- Settings: `{json.dumps(settings)}`", *[f"- Note: {n}" for n in notes], "",
          "Metrics: exact-match accuracy on fixed held-out sets; upstream = mean over the upstream tasks; "
          "H = harmonic mean of downstream and upstream. Cells: mean ± std over seeds (downstream/upstream "
          "means). Paired cells: mean difference over seeds [95% t-interval] and the number of seeds won "
          "out of n. Post-hoc repairs are applied to the full fine-tune at the same depth and seed; "
          "\"best setting\" is chosen per depth by mean H over the same seeds, for every method alike.", ""]
    for kind in kinds:
        depths = depths_of(agg, kind)
        md += [f"## {kind.upper()}", "",
               "### Training: full fine-tuning and masks (update ratio 0.1), by tuned depth", "",
               training_table(agg, kind, depths), "",
               "### Training, paired: Dowser mask minus each other mask", "", training_paired_table(agg, kind, depths),
               "", "### Post-hoc repair of the full fine-tune: each method at its best setting", "",
               posthoc_best_table(agg, kind, depths), "",
               "### Post-hoc, paired: the best Dowser-statistics repair (and `--restore`) minus each baseline's best",
               "", posthoc_paired_table(agg, kind, depths), ""]
        md += [f"- {s}" for s in findings(agg, kind, depths)] + [""]
        md += [f"![{p}]({p})" for p in plots(agg, kind, out, depths)] + [""]
        md += ["<details><summary>Every post-hoc setting</summary>", "", posthoc_all_table(agg, kind, depths), "",
               "</details>", ""]
    if len(kinds) > 1:
        table, winners = criterion_table(agg, kinds)
        md += ["## The criterion: above the best interpolation weight on both models at every depth", "",
               "Each repair at its best setting per model and depth (chosen like interpolation's weight, by mean H "
               "over the seeds), minus the best interpolation weight there, paired over seeds.", "", table, "",
               f"- Repairs above the best interpolation weight in every cell: {', '.join(winners) or 'none'}.", ""]
        md += ["## One setting for every model and depth", "",
               "Each repair's single setting with the highest mean H over both models and all depths (what a "
               "default would give); per-cell values are means over seeds.", "", one_setting_table(agg, kinds), ""]
    here = Path(__file__).parent
    if (here / "discussion.md").exists():
        md.append((here / "discussion.md").read_text())
    path = out / "RESULTS.md"
    path.write_text("\n".join(md) + "\n")
    return path
