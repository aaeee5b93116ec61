"""torchrun with 2 CPU processes (gloo) gives the single-process masks and statistics."""

import os
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
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "dowser_tool", "probe", str(example_llava), "--out", str(multi), *ARGS],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # only rank 0 writes and reports
    a, b = Sidecar(single), Sidecar(multi)
    assert torch.equal(a.probe_tokens(), b.probe_tokens())
    for n in a.names:
        assert torch.equal(a.mask(n), b.mask(n)), n
        for x, y in zip(a.stats(n), b.stats(n)):
            assert ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) <= 1e-6
