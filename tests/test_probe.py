import json

import pytest
import torch
from click.testing import CliRunner

from dowser_tool import Sidecar, open_checkpoint
from dowser_tool.cli import main
from dowser_tool.probe.run import ProbeRun, ProbeSettings, parse_layers
from dowser_tool.score import score_matrix, trainable_count

from .oracle import assert_run_matches_oracle


def probe_file(tmp_path, k=6, t=9, vocab=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, vocab, (k, t), generator=g).tolist()
    p = tmp_path / "probes.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p, torch.tensor(rows)


def assert_close_rel(got, want, rtol=1e-5):
    err = (got - want).abs().max() / want.abs().max().clamp_min(1e-30)
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("estimator", ["reference", "hutchinson"])
@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_streamed_statistics_equal_in_memory_oracle(kind, estimator, tmp_path, llama_dir, llava_dir):
    folder = llama_dir if kind == "llama" else llava_dir
    pf, tokens = probe_file(tmp_path)
    settings = ProbeSettings(probe_file=str(pf), batch_size=4, draws=3, estimator=estimator, include=("lm_head",),
                             resident="never")
    run = ProbeRun(open_checkpoint(folder), settings, progress=False)
    rec = run.collect()
    want, w = assert_run_matches_oracle(run, rec, folder)
    assert w.tolist() == [4.0, 2.0]  # batches of 4 and 2, weighted by size
    assert len(run.weights) == 2 * 7 + 1
    ckpt = open_checkpoint(folder)
    for x in run.weights:
        psi, a = torch.stack(rec.psi[x.key]), torch.stack(rec.a[x.key])
        W = ckpt.read(x.key)
        assert_close_rel(score_matrix(W, psi, a, w), score_matrix(W, *want[x.key], w))


def test_streamed_image_probe_with_vision_and_projector_equals_oracle(tmp_path):
    from .models import EXAMPLE_LLAVA

    pf, tokens = probe_file(tmp_path, k=4, t=6)
    settings = ProbeSettings(probe_file=str(pf), batch_size=2, draws=2, images=True,
                             include=("projector", "vision"), layers="1")
    run = ProbeRun(open_checkpoint(EXAMPLE_LLAVA), settings, progress=False)
    rec = run.collect()
    parts = {x.part for x in run.weights}
    assert parts == {"decoder", "vision", "projector"}
    # the vision layer after the selected feature layer (-2) cannot influence the output
    listed = {k for k, r in run.unscored.items() if "never scored" not in r}  # norms and biases: in every layer
    assert all("encoder.layers.1." in k for k in listed) and len(listed) == 6
    assert_run_matches_oracle(run, rec, EXAMPLE_LLAVA)
    for x in run.stem_weights:
        if x.part == "projector":  # boundary rule: a = 1
            assert torch.equal(torch.stack(rec.a[x.key]), torch.ones(len(rec.a[x.key]), x_in(run, x)))


def x_in(run, x):
    return run.sizes[x.key][1]


def test_probe_cli_writes_exact_ratio_and_is_deterministic(tmp_path, example_llava):
    out1, out2 = tmp_path / "a.dowser.safetensors", tmp_path / "b.dowser.safetensors"
    args = ["probe", str(example_llava), "--probes", "6", "--probe-len", "8", "--batch-size", "3", "--draws", "2",
            "--update-ratio", "0.2", "-q"]
    r = CliRunner().invoke(main, args + ["--out", str(out1)])
    assert r.exit_code == 0, r.output
    assert "0.8000 protected" in r.output
    CliRunner().invoke(main, args + ["--out", str(out2)])
    assert out1.read_bytes() == out2.read_bytes()  # same seed, same inputs: byte-identical
    sc = Sidecar(out1)
    assert len(sc.names) == 28 and sc.has_stats
    for n in sc.names:
        m = sc.mask(n)
        assert int((~m).sum()) == trainable_count(m.numel(), 0.2)
    assert sc.probe_tokens().shape == (6, 8)
    assert sc.metadata["base_model"]["id"] == str(example_llava)
    assert sc.metadata["probe"]["draws"] == 2 and sc.metadata["estimator"] == "reference"
    # a different seed gives different probes
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "c.dowser.safetensors"), "--seed", "1"])
    assert not torch.equal(Sidecar(tmp_path / "c.dowser.safetensors").probe_tokens(), sc.probe_tokens())
    # never overwrites without --force
    r = CliRunner().invoke(main, args + ["--out", str(out1)])
    assert r.exit_code == 1 and "already exists" in r.output


def test_mask_recut_equals_fresh_probe(tmp_path, example_llava):
    base = ["--probes", "4", "--probe-len", "6", "--batch-size", "2", "--draws", "2", "-q"]
    a, b, c = (tmp_path / f"{x}.dowser.safetensors" for x in "abc")
    assert CliRunner().invoke(main, ["probe", str(example_llava), "--out", str(a), *base]).exit_code == 0
    r = CliRunner().invoke(main, ["mask", str(a), "--update-ratio", "0.3", "--out", str(b)])
    assert r.exit_code == 0, r.output
    CliRunner().invoke(main, ["probe", str(example_llava), "--out", str(c), "--update-ratio", "0.3", *base])
    recut, fresh = Sidecar(b), Sidecar(c)
    for n in fresh.names:
        assert torch.equal(recut.mask(n), fresh.mask(n))
    assert recut.metadata["update_ratio"] == 0.3


@pytest.mark.parametrize("method", ["magnitude", "wanda", "random"])
def test_baselines(tmp_path, llama_dir, method):
    out = tmp_path / f"{method}.dowser.safetensors"
    r = CliRunner().invoke(main, ["probe", str(llama_dir), "--method", method, "--probes", "4", "--probe-len", "6",
                                  "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    sc = Sidecar(out)
    ckpt = open_checkpoint(llama_dir)
    for n in sc.names:
        m = sc.mask(n)
        assert int((~m).sum()) == trainable_count(m.numel(), 0.1)
        if method == "magnitude":  # protected entries are the largest |W|
            W = ckpt.read(n).abs()
            assert W[m].min() >= W[~m].max()
    assert sc.metadata["method"] == method


def test_layers_spec_and_include():
    assert parse_layers("last:2", 4) == [2, 3]
    assert parse_layers("0-1,3", 4) == [0, 1, 3]
    assert parse_layers(None, 3) == [0, 1, 2]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--update-ratio", "0"], "update ratio must be in (0, 1]"),
        (["--update-ratio", "1.5"], "update ratio must be in (0, 1]"),
        (["--layers", "7-9"], "the model has layers 0-1"),
        (["--include", "vision"], "needs image probes"),
        (["--include", "everything"], "--include takes"),
    ],
)
def test_probe_bad_options(tmp_path, llava_dir, args, message):
    out = tmp_path / "x.dowser.safetensors"
    r = CliRunner().invoke(main, ["probe", str(llava_dir), "--out", str(out), "-q", *args])
    assert r.exit_code == 1 and message in r.output, r.output
    assert not out.exists() and not list(tmp_path.glob(".x.*"))


def test_probe_unknown_model_type_is_one_line(tmp_path):
    from .models import make_llama

    d = make_llama(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no-such-family"
    (d / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["probe", str(d), "--out", str(tmp_path / "g.dowser.safetensors"), "-q"])
    assert r.exit_code == 1 and "no transformers class for model_type 'no-such-family'" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_probe_over_hub_reads_by_range(hub, tmp_path, llama_dir):
    sha = hub.add_repo("org/tiny", llama_dir)
    out = tmp_path / "hub.dowser.safetensors"
    r = CliRunner().invoke(main, ["probe", "org/tiny", "--out", str(out), "--probes", "2", "--probe-len", "4", "-q"])
    assert r.exit_code == 0, r.output
    assert Sidecar(out).metadata["base_model"] == {"id": "org/tiny", "revision": None, "sha": sha}
    assert all(req["range"] for req in hub.log.requests if "/resolve/" in req["path"]
               and req["path"].endswith(".safetensors"))


def test_quickstart_main_job(tmp_path):
    """The README's main job with default (published) settings, on the shipped pretrained example."""
    import shutil
    import subprocess
    import sys

    from .models import EXAMPLE_LLAVA

    model = shutil.copytree(EXAMPLE_LLAVA.parent / "tiny-llava-shapes", tmp_path / "tiny-llava-shapes")
    out = tmp_path / "tiny-llava-shapes.dowser.safetensors"
    r = subprocess.run([sys.executable, "-m", "dowser_tool", "probe", str(model), "--out", str(out), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sc = Sidecar(out)
    assert sc.probe_tokens().shape == (64, 64)
    assert sc.metadata["probe"]["draws"] == 8 and sc.metadata["probe"]["batch_size"] == 4
    assert sc.metadata["update_ratio"] == 0.1 and len(sc.names) == 4 * 7


