import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from dowser_tool.cli import main
from dowser_tool.sidecar.file import SidecarData, write_sidecar


@pytest.fixture()
def sidecar(tmp_path):
    masks = {
        "model.layers.0.mlp.up_proj.weight": torch.arange(40).reshape(8, 5) >= 4,  # 36/40 protected
        "model.layers.1.self_attn.q_proj.weight": torch.ones(4, 4, dtype=torch.bool),
    }
    info = {"base_model": {"id": "org/tiny", "sha": "0123456789abcdef"}, "method": "dowser",
            "estimator": "reference", "update_ratio": 0.1, "probe": {"count": 64, "length": 64}}
    return write_sidecar(tmp_path / "tiny.dowser.safetensors", SidecarData(masks, info=info))


def test_inspect_table(sidecar):
    r = CliRunner().invoke(main, ["inspect", str(sidecar)])
    assert r.exit_code == 0, r.output
    assert "org/tiny @ 0123456789abcdef" in r.output
    assert "model.layers.0.mlp.up_proj.weight" in r.output and "8x5" in r.output and "0.9000" in r.output
    assert "model.layers.1.self_attn.q_proj.weight" in r.output and "1.0000" in r.output
    assert "2 tensors, 56 weights" in r.output


def test_inspect_json(sidecar):
    r = CliRunner().invoke(main, ["inspect", str(sidecar), "--json"])
    doc = json.loads(r.output)
    rows = {row["tensor"]: row for row in doc["tensors"]}
    assert rows["model.layers.0.mlp.up_proj.weight"]["protected_fraction"] == 0.9
    assert rows["model.layers.0.mlp.up_proj.weight"]["shape"] == [8, 5]
    assert doc["metadata"]["base_model"]["sha"] == "0123456789abcdef"
    assert doc["protected_fraction"] == pytest.approx(52 / 56)


def test_inspect_plot(sidecar, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    r = CliRunner().invoke(main, ["inspect", str(sidecar), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x05\x00\x00\x00\x00\x00\x00\x00{nope", "not valid JSON"),
        (b"\xff\xff\xff\xff\xff\xff\xff\x7f", "exceeds the 100000000-byte limit"),
        (b"abc", "shorter than 8 bytes"),
    ],
)
def test_inspect_corrupt_file_one_line_error(tmp_path, content, message):
    bad = tmp_path / "bad.dowser.safetensors"
    bad.write_bytes(content)
    # the real console script: one line on stderr, exit 1, no traceback
    r = subprocess.run([sys.executable, "-m", "dowser_tool.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and message in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_inspect_missing_file(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "none.dowser.safetensors")])
    assert r.exit_code == 1 and "no such file" in r.output


def test_version_and_help():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "dowser, version" in r.output
    r = CliRunner().invoke(main, ["--help"])
    for cmd in ("probe", "merge", "inspect"):
        assert cmd in r.output


def test_inspect_shows_kinds_and_why_tensors_are_not_scored(tmp_path):
    masks = {"model.layers.0.mlp.experts.1.up_proj.weight": torch.ones(4, 2, dtype=torch.bool)}
    info = {"tensor_info": {"model.layers.0.mlp.experts.1.up_proj.weight":
                            {"part": "decoder", "kind": "expert", "layer": 0, "layout": "out_in", "expert": 1}},
            "unscored": {f"vision.layers.{i}.fc.weight": "cannot influence the output" for i in range(5)}}
    path = write_sidecar(tmp_path / "k.dowser.safetensors", SidecarData(masks, info=info))
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("model.layers.0.mlp.experts.1"))
    assert row.split()[1] == "expert"
    assert "not scored   5 tensors" in r.output
    assert "cannot influence the output: vision.layers.0.fc.weight" in r.output and "(5 in all)" in r.output
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    assert doc["tensors"][0]["kind"] == "expert" and doc["tensors"][0]["layer"] == 0
