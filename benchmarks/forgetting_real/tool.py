"""The benchmark's contact with dowser-tool's CLI: `python -m dowser_tool probe|merge` in a subprocess.

The subprocess inherits this interpreter's environment (PYTHONPATH included), so it runs the same
dowser_tool the benchmark imports.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def dowser(*args, log=None) -> dict:
    """Run `python -m dowser_tool ARGS`; returns wall seconds and the child's peak RSS (MB)."""
    cmd = [sys.executable, "-m", "dowser_tool", *map(str, args)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    if log:
        log(f"    dowser {' '.join(map(str, args[:2]))} ... {wall:.0f}s")
    # ru_maxrss of children is the largest of any child so far: exact for the first, an upper bound after
    return {"seconds": wall, "peak_rss_mb_upper": peak / 1024, "peak_grew": peak > before, "stdout": p.stdout}


def probe(base: Path, out: Path, method: str = "dowser", *, layers: str, seed: int = 0, probes: int = 64,
          draws: int = 8, batch_size: int = 4, probe_file: Path | None = None, extra=(), ratio: float = 0.1,
          log=None) -> Path:
    args = ["probe", base, "--out", out, "--method", method, "--layers", layers, "--seed", seed,
            "--update-ratio", ratio, "--dtype", "float32", "-q", "--force"]
    if method in ("dowser", "wanda"):
        args += ["--probes", probes, "--batch-size", batch_size]
    if method == "dowser":
        args += ["--draws", draws]
    if probe_file is not None:
        args += ["--probe-file", probe_file]
    dowser(*args, *extra, log=log)
    return out


def probe_tokens(sidecar: Path, out: Path) -> Path:
    """The sidecar's `probe/token_ids` as a JSONL token file (for `--probe-file`)."""
    from safetensors import safe_open

    with safe_open(str(sidecar), "pt") as f:
        ids = f.get_tensor("probe/token_ids")
    out.write_text("".join(json.dumps(r) + "\n" for r in ids.tolist()))
    return out


def merge_restore(base: Path, ft: Path, sidecar: Path, fractions: list[float], out: Path, log=None) -> dict:
    """`dowser merge --restore F1,F2,...` -> {F: output folder} (one value: OUT itself)."""
    spec = ",".join(f"{f:g}" for f in fractions)
    dowser("merge", "--base", base, "--finetuned", ft, "--mask", sidecar, "--restore", spec, "--out", out,
           "--force", "-q", log=log)
    return {f: (out if len(fractions) == 1 else Path(f"{out}-r{f:g}")) for f in fractions}


def merge_default(base: Path, ft: Path, sidecar: Path, out: Path, log=None) -> Path:
    """`dowser merge` with every default (the repair a user gets without options)."""
    dowser("merge", "--base", base, "--finetuned", ft, "--mask", sidecar, "--out", out, "--force", "-q", log=log)
    return out


def merge_interpolate(base: Path, ft: Path, alphas: list[float], out: Path, log=None) -> dict:
    """`dowser merge --interpolate A1,A2,...` (WiSE-FT) -> {alpha: output folder}."""
    spec = ",".join(f"{a:g}" for a in alphas)
    dowser("merge", "--base", base, "--finetuned", ft, "--interpolate", spec, "--out", out, "--force", "-q", log=log)
    return {a: (out if len(alphas) == 1 else Path(f"{out}-a{a:g}")) for a in alphas}


def recut(sidecar: Path, ratio: float, out: Path, log=None) -> Path:
    """`dowser mask SIDECAR --update-ratio RATIO`: the same statistics cut at another ratio."""
    dowser("mask", sidecar, "--update-ratio", ratio, "--out", out, "--force", log=log)
    return out
