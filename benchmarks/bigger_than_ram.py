"""Probe a checkpoint larger than the machine's memory, on the CPU, near the physical floor.

Writes a random-weight Llama-2-13B-shaped bf16 checkpoint (about 26 GB, more than
this machine's RAM; tensor by tensor, never whole in memory), measures the time to
read it once sequentially from a cold page cache, and probes it twice, each in a
fresh process with bf16 compute:
1. with a probe file (no generation): the forward and the reverse pass read the
   weights twice;
2. with a few short self-generated probes: when the weights fit in no memory tier,
   every generated token streams every layer once more (the floor), then two passes.

For each run it prints one JSON line: peak RSS, bytes read from disk (this process's
/proc/self/io read_bytes), passes over the weights (as the probe reports them), wall
time, and the floor = passes x the sequential read time + the measured compute time
(the probe's time minus the time its compute loop waited for weights to arrive), with
the ratios the targets speak of: disk bytes / checkpoint bytes and wall / floor.

    python -m benchmarks.bigger_than_ram [--work DIR] [--keep] [--shape 13b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .checkpoints import SHAPES, write_llama
from .measure import drop_page_cache


def disk_read_bytes() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def read_once(folder: Path) -> float:
    """Seconds to read every shard once, sequentially, from a cold page cache."""
    drop_page_cache(folder)
    t0 = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as h:
            while h.read(64 << 20):
                pass
    return time.perf_counter() - t0


def child(mode: str, model: Path, work: Path) -> None:
    """One probe in this process; prints its figures as JSON."""
    import torch

    from dowser_tool.probe.run import ProbeSettings, probe

    drop_page_cache(model)
    common = dict(batch_size=4, draws=2, device="cpu", dtype="bfloat16", resident="auto")
    if mode == "probe_file":
        tokens = torch.randint(3, 32000, (8, 16), generator=torch.Generator().manual_seed(0))
        probe_file = work / "probes.jsonl"
        probe_file.write_text("\n".join(json.dumps(r) for r in tokens.tolist()) + "\n")
        settings = ProbeSettings(probe_file=str(probe_file), **common)
    else:
        settings = ProbeSettings(probes=4, probe_len=8, **common)
    before = disk_read_bytes()
    t0 = time.perf_counter()
    s = probe(str(model), str(work / f"{mode}.dowser.safetensors"), settings=settings, force=True, progress=False)
    wall = time.perf_counter() - t0
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"wall_s": wall, "disk_read_bytes": disk_read_bytes() - before,
                      "peak_rss_bytes": int(hwm.split()[1]) * 1024, "weight_passes": s["weight_passes"],
                      "tier": s["tier"], "wait_s": s["wait_s"], "read_s": s["read_s"], "timings": s["timings"]}))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="Folder for the checkpoint [default: ./bigger-than-ram-work].")
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoint (reused by the next run).")
    ap.add_argument("--shape", default="13b", choices=sorted(SHAPES))
    ap.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return []
    work = (args.work or Path("bigger-than-ram-work")).resolve()
    model = work / f"llama-{args.shape}"
    rows = []

    def emit(row):
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    try:
        if not (model / "model.safetensors.index.json").exists():
            t0 = time.perf_counter()
            write_llama(model, **SHAPES[args.shape])
            emit({"figure": "write", "seconds": round(time.perf_counter() - t0, 1)})
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        ram = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        read_s = read_once(model)
        emit({"figure": "checkpoint", "bytes": size, "ram_bytes": ram, "larger_than_ram": size > ram,
              "read_once_s": round(read_s, 1), "read_gb_per_s": round(size / read_s / 1e9, 2)})
        for mode in ("probe_file", "generated"):
            r = subprocess.run([sys.executable, "-m", "benchmarks.bigger_than_ram", "--child", mode, str(model),
                                str(work)], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if r.returncode != 0:
                raise RuntimeError(f"{mode} failed:\n{r.stderr[-3000:]}")
            c = json.loads(r.stdout.strip().splitlines()[-1])
            probe_s = c["timings"].get("probe_s", 0.0) + c["timings"].get("generate_s", 0.0)
            compute_s = max(0.0, probe_s - c["wait_s"])
            floor = c["weight_passes"] * read_s + compute_s
            emit({"figure": mode, "wall_s": round(c["wall_s"], 1), "peak_rss_bytes": c["peak_rss_bytes"],
                  "disk_read_bytes": c["disk_read_bytes"], "disk_over_checkpoint": round(c["disk_read_bytes"] / size, 3),
                  "weight_passes": c["weight_passes"], "tier": c["tier"], "generate_s": round(c["timings"].get("generate_s", 0.0), 1),
                  "statistics_s": round(c["timings"].get("probe_s", 0.0), 1), "wait_for_weights_s": round(c["wait_s"], 1),
                  "compute_s": round(compute_s, 1), "floor_s": round(floor, 1), "wall_over_floor": round(c["wall_s"] / floor, 3),
                  "targets": {"peak_rss_under_4gb": c["peak_rss_bytes"] < 4e9,
                              "disk_reads": c["disk_read_bytes"] / size <= (2.1 if mode == "probe_file" else c["weight_passes"] + 0.1),
                              "wall_within_1_5x_floor": c["wall_s"] <= 1.5 * floor}})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
