"""Tables, paired intervals and Pareto plots from results.jsonl (whatever has finished).

    python -m benchmarks.forgetting_real.report WORK/results.jsonl [--out DIR]

Writes DIR/tables.md, DIR/summary.json, DIR/methods.png and DIR/repairs.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .suite import NEW, OLD

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
METRICS = ("new", "kept", "H", *NEW, *OLD, "text_nll")


def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def load(path: Path) -> tuple[list[dict], dict]:
    rows, meta = [], {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r["group"] == "meta":
            meta = r
        else:
            rows.append(r)
    return rows, meta


def aggregate(rows: list[dict]) -> dict:
    """(group, method, setting) -> {metric: (mean, sd), n, seeds: {seed: row}, strength}."""
    groups = defaultdict(dict)
    for r in rows:
        if r["group"] in ("train", "posthoc"):
            groups[(r["group"], r["method"], r.get("setting"))][r["seed"]] = r
    out = {}
    for k, by_seed in groups.items():
        rs = list(by_seed.values())
        out[k] = {m: (statistics.mean(r[m] for r in rs), statistics.stdev(r[m] for r in rs) if len(rs) > 1 else 0.0)
                  for m in METRICS if all(m in r for r in rs)}
        out[k].update(n=len(rs), seeds=by_seed, strength=rs[0].get("strength"))
    return out


def paired(a: dict, b: dict, metric: str) -> dict | None:
    """a - b over common seeds: mean, 95% t-interval, seeds where a > b, n."""
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    if not seeds:
        return None
    d = [a["seeds"][s][metric] - b["seeds"][s][metric] for s in seeds]
    mean = statistics.mean(d)
    half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return dict(mean=mean, lo=mean - half, hi=mean + half, wins=sum(x > 1e-12 for x in d),
                ties=sum(abs(x) <= 1e-12 for x in d), n=len(d))


def fmt_p(p: dict | None) -> str:
    if p is None:
        return "-"
    ci = "" if math.isnan(p["lo"]) else f" [{p['lo']:+.3f}, {p['hi']:+.3f}]"
    return f"{p['mean']:+.3f}{ci}, won {p['wins']}/{p['n']}"


def _ms(v, m):
    mean, sd = v[m]
    return f"{mean:.3f} ± {sd:.3f}"


def _table(header, lines) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows)


def best_of(agg: dict, family: str, metric: str = "H"):
    cands = [(k, v) for k, v in agg.items() if k[0] == "posthoc" and k[1] == family]
    return max(cands, key=lambda kv: kv[1][metric][0]) if cands else (None, None)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (kept, new) not dominated by another."""
    return sorted(p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points))


def build(rows: list[dict], meta: dict) -> tuple[str, dict]:
    agg = aggregate(rows)
    summary = {"rows": len(rows), "errors": [r for r in rows if r["group"] == "error"], "methods": {}, "paired": {}}
    cols = ["new", "kept", "H", *NEW, *OLD]
    head = ["method", "seeds", *cols]
    lines = []
    for (g, m, s), v in sorted(agg.items(), key=lambda kv: (kv[0][0] != "train", kv[0][1], str(kv[0][2]))):
        if g != "train":
            continue
        lines.append([m, v["n"], *(_ms(v, c) for c in cols)])
        summary["methods"][m] = {c: v[c][0] for c in cols} | {"n": v["n"]}
    out = ["### Training methods (mean ± sd over seeds)", "", _table(head, lines), ""]
    lines = []
    for (g, m, s), v in sorted(agg.items(), key=lambda kv: (kv[0][1], kv[1]["kept"][0])):
        if g != "posthoc":
            continue
        lines.append([m, s, v["n"], *(_ms(v, c) for c in cols)])
        summary["methods"][f"{m} {s}"] = {c: v[c][0] for c in cols} | {"n": v["n"]}
    out += ["### Post-hoc repairs of the full fine-tune (mean ± sd over seeds)", "",
            _table(["family", "setting", "seeds", *cols], lines), ""]
    # paired comparisons
    pairs = []
    tr = {k[1]: v for k, v in agg.items() if k[0] == "train"}
    for a, b in [("dowser", "random"), ("dowser", "wanda"), ("dowser", "magnitude"), ("dowser", "full-ft"),
                 ("dowser", "lora"), ("dowser", "supertuning-top"), ("dowser", "supertuning-bottom"),
                 ("random", "magnitude"), ("dowser lr x4", "random lr x4"), ("dowser chat-probes", "dowser"),
                 ("dowser chat-probes", "random"), ("dowser sparse-adapter", "dowser"),
                 ("dowser sparse-adapter", "random"), ("dowser rho 0.02", "random rho 0.02"),
                 ("dowser rho 0.02 lr x4", "random rho 0.02 lr x4")]:
        if a in tr and b in tr:
            pairs.append((f"train: {a} − {b}", paired(tr[a], tr[b], "kept"), paired(tr[a], tr[b], "new"),
                          paired(tr[a], tr[b], "H")))
    default = agg.get(("posthoc", "dowser merge --restore", "restore=0.1"))
    bk, bi = best_of(agg, "interpolation")
    if default and bi:
        pairs.append((f"post-hoc: dowser merge default (--restore 0.1) − best interpolation ({bk[2]})",
                      paired(default, bi, "kept"), paired(default, bi, "new"), paired(default, bi, "H")))
    br_k, br = best_of(agg, "dowser merge --restore")
    if br and bi:
        pairs.append((f"post-hoc: best --restore ({br_k[2]}) − best interpolation ({bk[2]})",
                      paired(br, bi, "kept"), paired(br, bi, "new"), paired(br, bi, "H")))
    for fam in ("LiNeS", "DG-Hard", "TIES", "DARE"):
        fk, fv = best_of(agg, fam)
        if fv and br:
            pairs.append((f"post-hoc: best --restore ({br_k[2]}) − best {fam} ({fk[2]})",
                          paired(br, fv, "kept"), paired(br, fv, "new"), paired(br, fv, "H")))
    if default and "full-ft" in tr:
        pairs.append(("post-hoc: dowser merge default − full-ft", paired(default, tr["full-ft"], "kept"),
                      paired(default, tr["full-ft"], "new"), paired(default, tr["full-ft"], "H")))
    out += ["### Paired differences (mean, 95% t-interval over common seeds, seeds won)", "",
            _table(["comparison", "kept", "new", "H"], [[n, fmt_p(k), fmt_p(w), fmt_p(h)] for n, k, w, h in pairs]),
            ""]
    summary["paired"] = {n: {"kept": k, "new": w, "H": h} for n, k, w, h in pairs}
    # matched-kept comparison: at the kept level of each --restore point, the interpolation curve's new accuracy
    interp = sorted((v["kept"][0], v["new"][0]) for k, v in agg.items() if k[:2] == ("posthoc", "interpolation"))
    lines = []
    for (g, m, s), v in sorted(agg.items(), key=lambda kv: kv[1]["kept"][0]):
        if g == "posthoc" and m != "interpolation" and len(interp) > 1:
            kx = v["kept"][0]
            y = _interp_at(interp, kx)
            lines.append([m, s, f"{kx:.3f}", f"{v['new'][0]:.3f}", "-" if y is None else f"{y:.3f}",
                          "-" if y is None else f"{v['new'][0] - y:+.3f}"])
    if lines:
        out += ["### Post-hoc repairs against the interpolation curve at the same kept level (means)", "",
                _table(["family", "setting", "kept", "new", "interpolation's new at that kept", "difference"], lines),
                ""]
    # Pareto check: is a point dominated (in mean kept and mean new) by any interpolation, LiNeS or
    # DG-Hard point?
    ref = [(k, v) for k, v in agg.items() if k[0] == "posthoc" and k[1] in ("interpolation", "LiNeS", "DG-Hard")]
    lines = []
    for (g, m, s_), v in sorted(agg.items(), key=lambda kv: (kv[0][1], kv[1]["kept"][0])):
        if g != "posthoc" and m not in ("dowser", "random", "wanda", "magnitude", "lora", "full-ft",
                                         "supertuning-top", "supertuning-bottom", "dowser lr x4", "random lr x4",
                                         "dowser chat-probes", "dowser sparse-adapter", "dowser rho 0.02",
                                         "random rho 0.02", "dowser rho 0.02 lr x4", "random rho 0.02 lr x4"):
            continue
        if (g == "posthoc" and m in ("interpolation", "LiNeS", "DG-Hard")) or not ref:
            continue
        dom = [f"{k[1]} {k[2]}" for k, w in ref
               if w["kept"][0] >= v["kept"][0] and w["new"][0] >= v["new"][0]
               and (w["kept"][0], w["new"][0]) != (v["kept"][0], v["new"][0])]
        lines.append([f"{g}: {m}", s_ or "", f"{v['kept'][0]:.3f}", f"{v['new'][0]:.3f}",
                      "on or above the front" if not dom else "dominated by " + ", ".join(dom)])
    if lines:
        out += ["### Against the Pareto front of interpolation, LiNeS and DG-Hard (means over seeds)", "",
                _table(["method", "setting", "kept", "new", "position"], lines), ""]
    full = agg.get(("train", "full-ft", None))
    if full:
        summary["full_ft_old_loss"] = 1 - full["kept"][0]
    return "\n".join(out), summary


def _interp_at(curve, x):
    """Piecewise-linear value of the (kept, new) curve at kept x; None outside its range."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.get_cmap("tab20").colors
    markers = "os^Dv<>ph*X"
    trained = [(k, v) for k, v in sorted(agg.items()) if k[0] == "train"]
    for i, ((g, m, s), v) in enumerate(trained):
        ax.errorbar(v["kept"][0], v["new"][0], xerr=v["kept"][1], yerr=v["new"][1], fmt=markers[i % len(markers)],
                    color=colors[i % len(colors)], capsize=3, label=f"{m} (n={v['n']})")
    paths.append(_save(plt, fig, ax, "kept old capability (mean of score / base score)",
                       "Training methods, SmolLM2-135M-Instruct, last 20 of 30 layers", out / "methods.png"))
    fig, ax = plt.subplots(figsize=(7, 5))
    fams = sorted({k[1] for k in agg if k[0] == "posthoc"})
    for fam in fams:
        pts = sorted((v["kept"][0], v["new"][0]) for k, v in agg.items() if k[:2] == ("posthoc", fam))
        ax.plot(*zip(*pts), "o-", label=fam, ms=4)
    for m in ("full-ft", "dowser", "random"):
        v = agg.get(("train", m, None))
        if v:
            ax.plot(v["kept"][0], v["new"][0], "k*" if m == "full-ft" else "s", ms=9, label=f"trained: {m}")
    paths.append(_save(plt, fig, ax, "kept old capability", "Post-hoc repairs of the full fine-tune (means over seeds)",
                       out / "repairs.png"))
    return paths


def _save(plt, fig, ax, xlabel: str, title: str, path: Path) -> Path:
    """Label a kept-vs-new plot, save it as `path` (PNG, 110 dpi) and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("new-task accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: Path, out: Path, plot: bool = True) -> dict:
    rows, meta = load(results)
    out.mkdir(parents=True, exist_ok=True)
    text, summary = build(rows, meta)
    (out / "tables.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if plot:
        summary["plots"] = [str(p) for p in plots(rows, out)]
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.results).parent
    s = write(Path(args.results), out)
    print((out / "tables.md").read_text())
    print(json.dumps({"errors": len(s["errors"]), "rows": s["rows"]}))


if __name__ == "__main__":
    main()
