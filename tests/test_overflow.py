"""No sidecar is ever written from non-finite activations, gradients or statistics (issue 22,
failure 1: Gemma in float16, transformers#36822). A Gemma 2 checkpoint stored in float16 whose own
float16 forward overflows (its float32 forward is finite) is refused in one line naming the layer
and the remedy, with a probe file, with `--method wanda` and with self-generated probes; computed
in float32 it probes with every statistic finite."""

import json
import subprocess
import sys

import pytest
import torch

from dowser_tool import DowserError, Sidecar
from dowser_tool.probe.settings import auto_gpu_dtype
from dowser_tool.sidecar.file import SidecarData, write_sidecar


@pytest.fixture(scope="module")
def gemma_f16(tmp_path_factory):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=2, eos_token_id=1,
                       pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # layer 0's MLP products exceed float16's 65504; float32 holds them
        model.model.layers[0].mlp.up_proj.weight.mul_(3000)
        model.model.layers[0].mlp.gate_proj.weight.mul_(3000)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        model = model.half()
        assert not torch.isfinite(model(ids).logits).all()  # the input really overflows in float16
    folder = tmp_path_factory.mktemp("gemma2-f16")
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    probes = folder.parent / "probes.jsonl"
    probes.write_text("\n".join(json.dumps([2] + list(range(10 + r, 17 + r))) for r in range(4)) + "\n")
    return folder, probes


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dowser_tool", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("extra", [["--method", "dowser"], ["--method", "wanda"], []])
def test_overflowing_float16_probe_is_refused_in_one_line(gemma_f16, tmp_path, extra):
    folder, probes = gemma_f16
    out = tmp_path / "m.dowser.safetensors"
    source = ["--probe-file", probes] if extra else ["--probes", "4", "--probe-len", "8"]  # [] -> self-generated
    r = _cli("probe", folder, "--out", out, "--dtype", "float16", "--batch-size", "2", "--draws", "2", "--quiet",
             *source, *extra)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "non-finite" in lines[0] and "float16" in lines[0] and "--dtype float32" in lines[0]
    if extra:  # through a probe file the forward reaches the overflowing layer: it is named
        assert "decoder layer 0 (model.layers.0)" in lines[0] or "output head" in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, no resume state


def test_the_same_checkpoint_in_float32_gives_finite_statistics(gemma_f16, tmp_path):
    folder, probes = gemma_f16
    out = tmp_path / "m.dowser.safetensors"
    r = _cli("probe", folder, "--out", out, "--dtype", "float32", "--batch-size", "2", "--draws", "2", "--quiet",
             "--probe-file", probes)
    assert r.returncode == 0, r.stderr
    assert "computed in float32 on cpu" in r.stdout
    sc = Sidecar(out)
    for name in sc.names:
        psi, a, w = sc.stats(name)
        assert torch.isfinite(psi).all() and torch.isfinite(a).all(), name


def test_no_sidecar_is_written_with_a_non_finite_statistic(tmp_path):
    psi = torch.tensor([[1.0, float("nan")]])
    data = SidecarData(masks={"w": torch.zeros(2, 3, dtype=torch.bool)}, psi={"w": psi}, a={"w": torch.ones(1, 3)},
                       update_weights=torch.ones(1))
    out = tmp_path / "x.dowser.safetensors"
    with pytest.raises(DowserError, match=r"psi/w holds 1 non-finite values"):
        write_sidecar(out, data)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_auto_dtype_on_a_gpu_never_picks_float16():
    for stored in ("float16", "bfloat16", "float32", None):
        assert auto_gpu_dtype({"dtype": stored}, bf16_supported=True) is torch.bfloat16
        assert auto_gpu_dtype({"dtype": stored}, bf16_supported=False) is torch.float32

