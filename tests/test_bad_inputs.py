"""Every bad input: a one-line error naming the file and the problem, exit 1, no traceback, no output."""

import errno
import json
import shutil
import struct

import pytest
from click.testing import CliRunner

from dowser_tool.cli import main

from .models import make_llama


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(r, out, *fragments):
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)  # handled, not a crash
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    assert "Traceback" not in r.output
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporaries


@pytest.fixture()
def model(tmp_path, llama_dir):
    return shutil.copytree(llama_dir, tmp_path / "model")


@pytest.fixture()
def out(tmp_path):
    return tmp_path / "out.dowser.safetensors"


def shard(model):
    return model / "model.safetensors"


def test_missing_folder(tmp_path, out):
    assert_clean_failure(run(["probe", tmp_path / "absent", "--out", out]), out, "absent", "no such folder")


def test_missing_repo_and_revision(hub, tmp_path, out, llama_dir):
    assert_clean_failure(run(["probe", "org/absent", "--out", out]), out, "org/absent", "no such repo")
    hub.add_repo("org/m", llama_dir)
    assert_clean_failure(run(["probe", "org/m", "--revision", "v9", "--out", out]), out, "org/m",
                         "revision 'v9' does not exist")


def test_truncated_shard(model, out):
    data = shard(model).read_bytes()
    shard(model).write_bytes(data[: len(data) // 2])
    assert_clean_failure(run(["probe", model, "--out", out]), out, "model.safetensors", "truncated")


def test_header_not_json(model, out):
    data = shard(model).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    shard(model).write_bytes(data[:8] + b"{" * n + data[8 + n :])
    assert_clean_failure(run(["probe", model, "--out", out]), out, "model.safetensors", "not valid JSON")


@pytest.mark.parametrize("lie,message", [("range", "ends at byte"), ("size", "needs"), ("overlap", "overlap")])
def test_header_lies(model, out, lie, message):
    data = shard(model).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = header[names[0]], header[names[1]]
    if lie == "range":
        a["data_offsets"] = [o + 10**9 for o in a["data_offsets"]]
    elif lie == "size":
        a["shape"] = [s + 1 for s in a["shape"]]
    else:
        first, second = sorted((a, b), key=lambda e: e["data_offsets"][0])
        shift = 4
        second["data_offsets"] = [second["data_offsets"][0] - shift, second["data_offsets"][1] - shift]
    raw = json.dumps(header).encode()
    shard(model).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    assert_clean_failure(run(["probe", model, "--out", out]), out, "model.safetensors", message)


def test_header_length_beyond_limit(model, out):
    data = shard(model).read_bytes()
    shard(model).write_bytes(struct.pack("<Q", 2**62) + data[8:])
    assert_clean_failure(run(["probe", model, "--out", out]), out, "model.safetensors", "exceeds")


def test_index_names_missing_shard(tmp_path, out):
    model = make_llama(tmp_path / "sharded", shard_size="40KB")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[0]
    (model / missing).unlink()
    assert_clean_failure(run(["probe", model, "--out", out]), out, "model.safetensors.index.json", missing)


def test_no_decoder_layers(model, out):
    from safetensors.torch import load_file, save_file

    sd = {k: v for k, v in load_file(shard(model)).items() if ".layers." not in k}
    save_file(sd, str(shard(model)), metadata={"format": "pt"})
    assert_clean_failure(run(["probe", model, "--out", out]), out, "no tensor for")


def test_sidecar_from_another_tool_and_newer_version(tmp_path, model, out):
    from safetensors.torch import save_file
    import torch

    foreign = tmp_path / "foreign.dowser.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"format": "other"})
    assert_clean_failure(run(["mask", foreign, "--update-ratio", "0.2", "--out", out]), out, foreign,
                         "not a dowser sidecar")
    newer = tmp_path / "newer.dowser.safetensors"
    save_file({"x": torch.zeros(2)}, str(newer), metadata={"format": "dowser-mask", "format_version": "7"})
    assert_clean_failure(run(["inspect", newer]), None, "format version 7 is newer")


def test_sidecar_shapes_do_not_match_model(tmp_path, model, out):
    side = tmp_path / "m.dowser.safetensors"
    assert run(["probe", model, "--out", side, "--probes", "2", "--probe-len", "4", "-q"]).exit_code == 0
    other = make_llama(tmp_path / "wider", hidden=48)
    assert_clean_failure(run(["mask", side, "--update-ratio", "0.2", "--base", other, "--out", out]), out,
                         "shape")


@pytest.mark.parametrize("ratio", ["0", "-0.1", "1.01"])
def test_update_ratio_outside_range(model, out, ratio):
    assert_clean_failure(run(["probe", model, "--update-ratio", ratio, "--out", out]), out, "(0, 1]")


def test_output_inside_input(model):
    out = model / "inside.dowser.safetensors"
    assert_clean_failure(run(["probe", model, "--out", out]), out, "must not be inside")


def test_full_disk(model, out, monkeypatch):
    from dowser_tool.io import layout as safetensors_format
    def full(self, name, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_format.StreamingWriter, "write", full)
    r = run(["probe", model, "--out", out, "--probes", "2", "--probe-len", "4", "-q"])
    assert_clean_failure(r, out, str(out), "No space left on device")


def test_probe_file_problems(tmp_path, model, out):
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text("[1, 2, 3]\n[4, 5]\n")
    assert_clean_failure(run(["probe", model, "--probe-file", ragged, "--out", out]), out, ragged, "same length")
    big = tmp_path / "big.jsonl"
    big.write_text("[1, 2, 99999]\n")
    assert_clean_failure(run(["probe", model, "--probe-file", big, "--out", out]), out, big, "outside the vocabulary")


def test_checkpoint_code_is_never_executed(model, out, tmp_path):
    """A config pointing at custom code (auto_map) must not make us import it."""
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaForCausalLM as Evil\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"}
    (model / "config.json").write_text(json.dumps(cfg))
    r = run(["probe", model, "--out", out, "--probes", "2", "--probe-len", "4", "-q"])
    assert not marker.exists()
    assert r.exit_code == 0, r.output  # built from transformers' own Llama class; evil.py never imported


def test_bos_outside_the_vocabulary(model, out):
    config = json.loads((model / "config.json").read_text())
    config["bos_token_id"] = config["vocab_size"] + 1000
    (model / "config.json").write_text(json.dumps(config))
    assert_clean_failure(run(["probe", model, "--probes", "2", "--probe-len", "4", "--draws", "1", "--out", out, "-q"]),
                         out, "BOS, id", "outside the vocabulary", "--probe-file")


def test_failed_image_probe_leaves_no_resume_state(tmp_path, out):
    """A VLM folder without processor files: --images fails in one line and leaves nothing behind,
    so the next run (without --images) is not told an interrupted run is waiting."""
    from .models import make_llava

    vlm = make_llava(tmp_path / "vlm")
    args = ["probe", vlm, "--probes", "2", "--probe-len", "4", "--draws", "1", "--out", out, "-q"]
    r = run([*args, "--images"])
    assert_clean_failure(r, out, "--images needs the model's processor")
    assert r.output.rstrip().endswith(")") and "'" + "qw)" not in r.output
    assert not out.with_name(out.name + ".resume").exists()
    r = run(args)
    assert r.exit_code == 0, r.output


def test_unreachable_hub_says_there_is_no_local_folder_either(tmp_path, out, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert_clean_failure(run(["probe", "nope", "--out", out]), out, "cannot reach", "no local folder 'nope'")


def test_one_line_on_stderr_in_a_real_process(model, out):
    """Outside CliRunner: transformers' own warnings about the same bad config (it checks token ids
    too) must not surround our one line."""
    import os
    import subprocess
    import sys

    config = json.loads((model / "config.json").read_text())
    config["bos_token_id"] = config["eos_token_id"] = config["vocab_size"] + 1000
    (model / "config.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    r = subprocess.run([sys.executable, "-m", "dowser_tool", "probe", str(model), "--probes", "2", "--probe-len", "4",
                        "--draws", "1", "-q", "--out", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "outside the vocabulary" in lines[0], r.stderr
    assert not out.exists()
