"""Run a command in a fresh Python process and report its peak resident memory and wall time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# VmHWM, not ru_maxrss: after fork+exec, ru_maxrss still counts the parent's peak.
_WRAPPER = (
    "import runpy, sys\n"
    "module, sys.argv = sys.argv[1], sys.argv[1:]\n"
    "try:\n    runpy.run_module(module, run_name='__main__')\nexcept SystemExit as e:\n"
    "    if e.code not in (None, 0):\n        raise\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "print('PEAK_RSS', int(hwm) * 1024, file=sys.stderr)\n"
)


def run_measured(module: str, args, env=None) -> dict:
    """`python -m module args...` in a new process: {peak_rss_bytes, wall_s, stdout}."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _WRAPPER, module, *map(str, args)], capture_output=True, text=True,
                       env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0 or "PEAK_RSS" not in r.stderr:
        raise RuntimeError(f"{module} {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    peak = int(r.stderr.rsplit("PEAK_RSS", 1)[1].split()[0])
    return {"peak_rss_bytes": peak, "wall_s": round(wall, 2), "stdout": r.stdout}


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of a checkpoint's shards (written back first), so
    the next reads come from the disk."""
    for f in Path(folder).glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
