"""Each byte of the checkpoint leaves its source once; where layers live does not change the result."""

import os

import pytest
from click.testing import CliRunner

from dowser_tool.cli import main

from .models import make_llama


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama4") / "m", layers=4, hidden=64, vocab=128)


def probe(args):
    r = CliRunner().invoke(main, ["probe", *map(str, args), "-q"])
    assert r.exit_code == 0, r.output
    return r.output


def checkpoint_bytes(folder):
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_hub_probe_transfers_the_checkpoint_once(hub, tmp_path, llama4, monkeypatch):
    """Generated probes (15 steps) plus forward and reverse passes, not kept resident: one transfer."""
    hub.add_repo("org/m", llama4)
    monkeypatch.chdir(tmp_path)  # the layer cache goes to the working directory
    out = probe(["org/m", "--probe-len", "16", "--resident", "never", "--out", tmp_path / "hub.dowser.safetensors"])
    sent = hub.log.bytes_sent(".safetensors")
    assert sent <= 1.1 * checkpoint_bytes(llama4), (sent, checkpoint_bytes(llama4))
    assert "17 passes over the weights" in out  # 15 generation steps + forward + reverse, from the local cache
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dowser-layers-")]  # cache removed

    # the same checkpoint read from local files (whole shards in the HF cache; then offline) gives the same bytes
    probe(["org/m", "--probe-len", "16", "--resident", "never", "--download", "--out", tmp_path / "dl.dowser.safetensors"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probe(["org/m", "--probe-len", "16", "--resident", "never", "--out", tmp_path / "local.dowser.safetensors"])
    hub_bytes = (tmp_path / "hub.dowser.safetensors").read_bytes()
    assert hub_bytes == (tmp_path / "dl.dowser.safetensors").read_bytes()
    assert hub_bytes == (tmp_path / "local.dowser.safetensors").read_bytes()


def test_resident_and_streamed_layers_give_identical_sidecars(tmp_path, llama4):
    common = ["--probes", "8", "--probe-len", "12", "--draws", "2"]
    a = probe([llama4, *common, "--resident", "always", "--out", tmp_path / "a.dowser.safetensors"])
    b = probe([llama4, *common, "--resident", "never", "--out", tmp_path / "b.dowser.safetensors"])
    assert "weights read once, kept in RAM" in a and "13 passes over the weights" in b
    assert (tmp_path / "a.dowser.safetensors").read_bytes() == (tmp_path / "b.dowser.safetensors").read_bytes()


def test_layer_cache_refuses_a_disk_too_small(hub, tmp_path, llama4, monkeypatch):
    import shutil
    from collections import namedtuple

    hub.add_repo("org/m", llama4)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    r = CliRunner().invoke(main, ["probe", "org/m", "--resident", "never", "--cache-dir", str(tmp_path),
                                  "--out", str(tmp_path / "x.dowser.safetensors"), "-q"])
    assert r.exit_code == 1 and "the layer cache needs" in r.output and "--cache-dir" in r.output, r.output
    assert not (tmp_path / "x.dowser.safetensors").exists()


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_masks_cut_in_the_last_pass_equal_masks_cut_from_the_checkpoint(llama4, dtype):
    """The last pass cuts each layer's masks from its loaded weights (no extra read) when the compute
    dtype holds the stored values exactly; otherwise they are read again. Same masks either way."""
    import torch

    from dowser_tool import open_checkpoint
    from dowser_tool.probe.run import ProbeRun, ProbeSettings
    from dowser_tool.score import cut_mask, score_matrix

    ckpt = open_checkpoint(llama4)
    run = ProbeRun(ckpt, ProbeSettings(probes=4, probe_len=6, draws=2, dtype=dtype, resident="never"), progress=False)
    data = run.run()
    # float32 weights computed in float32: cut in the pass; in bfloat16: not exact, read again
    assert bool(run.cut_early) == (dtype == "auto")
    for key, packed in data.masks.items():
        want = cut_mask(score_matrix(ckpt.read(key), data.psi[key], data.a[key], data.update_weights), 0.1)
        assert torch.equal(packed.unpack(), want), key


def test_outputs_follow_the_umask(tmp_path, llama4):
    """Sidecars and merged folders get the permissions any new file or folder gets (not private)."""
    import stat

    old = os.umask(0o022)
    try:
        sidecar = tmp_path / "m.dowser.safetensors"
        probe([llama4, "--probes", "2", "--probe-len", "4", "--draws", "1", "--out", sidecar])
        r = CliRunner().invoke(main, ["merge", "--base", str(llama4), "--finetuned", str(llama4), "--mask",
                                      str(sidecar), "--out", str(tmp_path / "merged"), "-q"])
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in (tmp_path / "merged").iterdir())


def test_layer_cache_is_removed_even_without_close(hub, tmp_path, llama4):
    """A runner dropped without close() (an exception in code that holds it) leaves no cache behind."""
    import gc

    import torch

    from dowser_tool import open_checkpoint
    from dowser_tool.model.streaming import BlockRunner

    hub.add_repo("org/m", llama4)
    runner = BlockRunner(open_checkpoint("org/m"), torch.device("cpu"), torch.float32, residency="stream",
                         cache_dir=str(tmp_path))
    runner.fetch_layer(0)
    assert len(list(tmp_path.glob(".dowser-layers-*"))) == 1
    del runner
    gc.collect()
    assert not list(tmp_path.glob(".dowser-layers-*"))
