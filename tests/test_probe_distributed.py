"""torchrun with 2 CPU processes (gloo) gives the single-process masks and statistics."""

import os
import signal
import subprocess
import sys

import torch

from dowser_tool import Sidecar

ARGS = ["--probes", "10", "--probe-len", "12", "--batch-size", "2", "--draws", "2", "-q"]


def test_two_processes_equal_one(tmp_path, example_llava):
    single = tmp_path / "single.dowser.safetensors"
    r = subprocess.run([sys.executable, "-m", "dowser_tool", "probe", str(example_llava), "--out", str(single), *ARGS],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    multi = tmp_path / "multi.dowser.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # its own session, so that a hung rank can be killed with the launcher (no orphans left behind)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "dowser_tool", "probe", str(example_llava), "--out", str(multi), *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("wrote ") == 1  # only rank 0 writes and reports
    a, b = Sidecar(single), Sidecar(multi)
    assert torch.equal(a.probe_tokens(), b.probe_tokens())
    for n in a.names:
        assert torch.equal(a.mask(n), b.mask(n)), n
        for x, y in zip(a.stats(n), b.stats(n)):
            assert ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) <= 1e-6
