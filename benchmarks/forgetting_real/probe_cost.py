"""Probe cost on the real model: `dowser probe` against the in-memory reference algorithm, same probes.

    python -m benchmarks.forgetting_real.probe_cost [--probes 8] [--draws 2] [--out FILE.jsonl]

Both run as child processes one after the other on the same token file (the first PROBES probes the
tool generated for the benchmark, or fresh ones), the same batch size and draws, every decoder layer
scored; wall time and peak RSS come from /usr/bin/time (GNU time -v). One JSON line per figure; the
last line compares the scores (the tool's statistics rebuilt into |W| (.) Psi^T diag(w) A / sum(w)
against the reference's score matrices).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import asset


def timed(cmd: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        p = subprocess.run(["/usr/bin/time", "-v", "-o", t.name, *cmd], capture_output=True, text=True,
                           env={**os.environ, "TQDM_DISABLE": "1"})
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
        text = Path(t.name).read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    cpu = re.search(r"User time \(seconds\): ([\d.]+)", text).group(1)
    return {"seconds": round(h * 3600 + m * 60 + s, 2), "cpu_user_seconds": float(cpu), "peak_rss_mb": round(rss / 1024, 1)}


def compare(sidecar: Path, reference: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from dowser_tool import Sidecar

    base = load_file(str(asset.default_cache() / "model.safetensors"))
    ref = load_file(str(reference))
    sc = Sidecar(str(sidecar))
    worst, n = 0.0, 0
    for name in sc.names:
        psi, a, w = sc.stats(name)
        ours = base[name].abs().float() * ((psi.float() * w[:, None]).T @ a.float()) / w.sum()
        theirs = ref[name]
        rel = float((ours - theirs).abs().max() / theirs.abs().max())
        worst = max(worst, rel)
        n += 1
    return {"figure": "score agreement", "matrices": n, "max_relative_difference": worst}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tokens", default=None, help="JSONL token file [default: the benchmark's probes]")
    ap.add_argument("--out", default=None, help="append the JSON lines here too")
    args = ap.parse_args(argv)
    base = asset.build()
    work = Path(tempfile.mkdtemp(prefix="probe-cost-"))
    src = Path(args.tokens) if args.tokens else asset.default_cache().parent / "work-full" / "probes.jsonl"
    tokens = work / "probes.jsonl"
    if src.exists():
        tokens.write_text("".join(src.read_text().splitlines(keepends=True)[: args.probes]))
    else:  # probes of the tool's own kind: generate them with the tool
        from . import tool

        tool.probe(base, work / "gen.dowser.safetensors", "dowser", layers="all", probes=args.probes, draws=1)
        tool.probe_tokens(work / "gen.dowser.safetensors", tokens)
    n = len(tokens.read_text().splitlines())
    settings = {"model": "SmolLM2-135M-Instruct (float32)", "probes": n, "draws": args.draws,
                "batch_size": args.batch_size, "layers": "all 30", "threads": os.environ.get("OMP_NUM_THREADS")}
    lines = []

    def emit(line):
        lines.append(line)
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")

    side = work / "tool.dowser.safetensors"
    tool_fig = timed([sys.executable, "-m", "dowser_tool", "probe", str(base), "--probe-file", str(tokens),
                      "--draws", str(args.draws), "--batch-size", str(args.batch_size), "--dtype", "float32",
                      "--out", str(side), "-q", "--force"])
    emit({"figure": "dowser probe", **settings, **tool_fig})
    ref = work / "reference.safetensors"
    ref_fig = timed([sys.executable, "-m", "benchmarks.reference_probe", str(base), str(tokens), str(ref),
                     "--batch-size", str(args.batch_size), "--draws", str(args.draws)])
    emit({"figure": "reference_probe (in memory)", **settings, **ref_fig})
    emit({"figure": "ratio tool / reference", "seconds": round(tool_fig["seconds"] / ref_fig["seconds"], 3),
          "cpu_user_seconds": round(tool_fig["cpu_user_seconds"] / ref_fig["cpu_user_seconds"], 3),
          "peak_rss": round(tool_fig["peak_rss_mb"] / ref_fig["peak_rss_mb"], 3)})
    emit(compare(side, ref))


if __name__ == "__main__":
    main()
