"""Interrupted probes leave nothing half-written, and --resume finishes them byte-identically."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dowser_tool import Sidecar

ARGS = ["--probes", "16", "--probe-len", "24", "--batch-size", "2", "--draws", "2", "-q"]


def dowser(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "dowser_tool", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_progress(state, proc, done_at_least, timeout=120):
    """Poll the resume state until `done_at_least` batches are recorded in it."""
    from dowser_tool.io.layout import read_header

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail("probe finished before it could be interrupted: " + proc.stderr.read())
        try:
            if state.exists() and int(read_header(state).metadata["done"]) >= done_at_least:
                return
        except Exception:
            pass  # the state is being renamed into place
        time.sleep(0.05)
    pytest.fail("no progress recorded")


@pytest.fixture()
def tmp_env(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return env


def test_kill_then_resume_is_byte_identical(tmp_path, example_llava, tmp_env):
    full = tmp_path / "full.dowser.safetensors"
    r = dowser("probe", example_llava, "--out", full, *ARGS, env=tmp_env)
    assert r.wait() == 0, r.stderr.read()

    out = tmp_path / "part.dowser.safetensors"
    state = tmp_path / "part.dowser.safetensors.resume"
    proc = dowser("probe", example_llava, "--out", out, *ARGS, "--activation-budget", "1", env=tmp_env)
    wait_for_progress(state, proc, 2)
    proc.kill()  # SIGKILL: no chance to clean up; the state file is what survives
    proc.wait()
    assert not out.exists() and state.exists()

    again = dowser("probe", example_llava, "--out", out, *ARGS, env=tmp_env)
    assert again.wait() == 1 and "pass --resume" in again.stderr.read()

    resumed = dowser("probe", example_llava, "--out", out, *ARGS, "--resume", env=tmp_env)
    assert resumed.wait() == 0, resumed.stderr.read()
    assert out.read_bytes() == full.read_bytes()
    assert not state.exists()


def test_sigterm_leaves_no_output_and_no_temporaries(tmp_path, example_llava, tmp_env):
    out = tmp_path / "x.dowser.safetensors"
    state = tmp_path / "x.dowser.safetensors.resume"
    # a 1-byte budget: one batch per pass and activations spilled to temporary files
    proc = dowser("probe", example_llava, "--out", out, *ARGS, "--activation-budget", "1", env=tmp_env)
    wait_for_progress(state, proc, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x.")] == []
    # spilled activations removed (torch may leave its own compiler cache folder there)
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("dowser-")] == []


def test_passes_and_spilling_do_not_change_the_result(tmp_path, example_llava):
    from click.testing import CliRunner

    from dowser_tool.cli import main

    outs = []
    for budget in (None, "1"):
        out = tmp_path / f"{budget}.dowser.safetensors"
        extra = ["--activation-budget", budget] if budget else []
        r = CliRunner().invoke(main, ["probe", str(example_llava), "--out", str(out), *ARGS, *extra])
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert "8 passes, activations spilled to disk" in r.output
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_thread_count_does_not_change_masks(tmp_path, example_llava):
    """Same seed on 1 and 2 CPU threads: identical masks (statistics agree to float rounding)."""
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.dowser.safetensors"
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        p = dowser("probe", example_llava, "--out", out, *ARGS, env=env)
        assert p.wait() == 0, p.stderr.read()
        outs.append(Sidecar(out))
    a, b = outs
    assert torch.equal(a.probe_tokens(), b.probe_tokens())
    for n in a.names:
        torch.testing.assert_close(a.stats(n)[0], b.stats(n)[0], rtol=1e-5, atol=0)
        assert torch.equal(a.mask(n), b.mask(n))
