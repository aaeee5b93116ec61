"""Issue 23 item 3: `dowser merge` takes a peft Super-Tuning sparse adapter (made from a sidecar by
`dowser_tool.train.sparse.sparse_adapter`) as the fine-tune, bit-exact against peft's own
`merge_and_unload`, repeated indices added as peft adds them; `dowser inspect ADAPTER_DIR` says
which sidecar (path, SHA-256) and which base the adapter was made from, without torch."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("peft")

from dowser_tool import Sidecar, open_checkpoint
from dowser_tool.repair.merge import merge_checkpoint
from dowser_tool.score import cut_mask, score_matrix
from dowser_tool.sidecar.file import SidecarData, write_sidecar
from dowser_tool.train.sparse import ADAPTER_RECORD, sparse_adapter

from .models import make_llama
from .test_merge import run_cli, same_bits, state_dict

ROOT = Path(__file__).resolve().parents[1]
RHO = 0.1


def sidecar_for(model_dir, out):
    """Masks over every decoder linear (cut at RHO from random statistics), with update_ratio RHO recorded,
    so `--restore 0.9` applies the sidecar's own masks, the ones the adapter trains around."""
    ckpt = open_checkpoint(model_dir)
    gen, w = torch.Generator().manual_seed(0), torch.tensor([4.0, 4.0])
    data = SidecarData(masks={}, update_weights=w, info={"base_model": {"id": str(model_dir)}, "update_ratio": RHO})
    for name in ckpt.tensor_names():
        if name.endswith("proj.weight"):
            weight = ckpt.read(name).float()
            psi, a = torch.rand(2, weight.shape[0], generator=gen), torch.rand(2, weight.shape[1], generator=gen)
            data.masks[name] = cut_mask(score_matrix(weight, psi, a, w), RHO)
            data.psi[name], data.a[name] = psi, a
    return write_sidecar(out, data)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def trained(request, tmp_path_factory):
    """BASE (hidden 64: peft's single sparsity forces padding slots, i.e. repeated indices), its sidecar,
    and a saved sparse adapter whose every value slot, padding included, holds a non-zero value, so
    repeated indices carry several values that must be added."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("sparse-merge")
    base = make_llama(tmp / "base", hidden=64, layers=2, dtype=request.param)
    sidecar = sidecar_for(base, tmp / "m.dowser.safetensors")
    adapter = sparse_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=request.param), sidecar)
    assert adapter.dowser_record["padding"], "the test needs repeated indices"
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if "supertuning_values" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    adapter.save_pretrained(tmp / "adapter")
    return base, sidecar, tmp / "adapter", request.param


def peft_merged(base, adapter_dir, dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter_dir)
    return {n: p.detach().clone() for n, p in model.merge_and_unload().named_parameters()}


def test_merge_of_a_sparse_adapter_equals_merge_and_unload_bit_for_bit(trained, tmp_path):
    base, sidecar, adapter, dtype = trained
    saved = load_file(adapter / "adapter_model.safetensors")
    repeats = 0
    for key, idx in saved.items():
        if key.endswith("supertuning_indices"):
            assert idx.dtype == torch.int32
            repeats += idx.numel() - torch.unique(idx).numel()
    assert repeats > 0  # repeated indices with non-zero values are in the file
    reference = peft_merged(base, adapter, dtype)
    (summary,) = merge_checkpoint(base, adapter, sidecar, tmp_path / "out", restore=1 - RHO, progress=False)
    got, base_sd, side = state_dict(tmp_path / "out"), state_dict(base), Sidecar(sidecar)
    assert set(got) == set(reference)
    changed = 0
    for name, want in reference.items():
        assert same_bits(got[name], want.to(got[name].dtype)), name  # the whole tensor, bit for bit
        if name in side.names:  # protected entries are BASE's, trainable ones moved
            protected = side.mask(name)
            assert same_bits(got[name][protected], base_sd[name][protected]), name
            changed += int((got[name] != base_sd[name]).sum())
    assert changed > 0
    record = json.loads((tmp_path / "out" / "dowser_repair.json").read_text())
    assert record["finetuned"]["kind"] == "sparse-adapter"


def test_repeated_indices_are_added_in_the_weights_dtype(trained):
    """By hand, without peft: W.flat.scatter_add_(indices, values.to(W.dtype)); a repeated index gets the
    sum of its values (here checked on one matrix against an explicit loop over the slots)."""
    base, _, adapter, dtype = trained
    from dowser_tool.model.keys import KeyRules
    from dowser_tool.repair.supertuning import SparseAdapter

    ckpt = open_checkpoint(adapter)
    sparse = SparseAdapter(ckpt, KeyRules(None))
    name = "model.layers.0.mlp.up_proj.weight"
    w = state_dict(base)[name]
    got = sparse.apply(name, w)
    idx = ckpt.read(sparse.pairs[name].indices).tolist()
    val = ckpt.read(sparse.pairs[name].values).to(dtype)
    want = w.clone().reshape(-1)
    for i, v in zip(idx, val):
        want[i] = want[i] + v
    assert len(idx) > len(set(idx)) and same_bits(got, want.reshape(w.shape))


@pytest.mark.parametrize("change,message", [
    ({"r": 4, "lora_alpha": 8}, "Supra mode"),
    ({"save_precomputed_indices": False}, "save_precomputed_indices=false"),
])
def test_sparse_adapters_it_cannot_merge_are_refused_by_name(trained, tmp_path, change, message):
    base, sidecar, adapter, _ = trained
    copy = tmp_path / "adapter"
    copy.mkdir()
    (copy / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **change}))
    code, out = run_cli("--base", base, "--finetuned", copy, "--mask", sidecar, "--out", tmp_path / "out", "-q")
    assert code == 1 and message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "out").exists()


def test_indices_outside_the_weight_are_refused(trained, tmp_path):
    base, sidecar, adapter, _ = trained
    copy = tmp_path / "adapter"
    copy.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.k_proj.supertuning_indices"
    tensors[key] = tensors[key].clone()
    tensors[key][0] = 10**6
    save_file(tensors, copy / "adapter_model.safetensors")
    (copy / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    code, out = run_cli("--base", base, "--finetuned", copy, "--mask", sidecar, "--out", tmp_path / "out", "-q")
    assert code == 1 and "indexes entries outside" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "out").exists()


# ---- dowser inspect ADAPTER_DIR --------------------------------------------------------------
def _inspect(*args) -> tuple[str, list[str]]:
    """Run `dowser inspect` in a fresh interpreter: (stdout, heavy modules it imported)."""
    code = ("import sys\nfrom dowser_tool.cli import main\n"
            f"try:\n    main(['inspect', *{[str(a) for a in args]!r}], standalone_mode=False)\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    heavy = json.loads(out.splitlines()[-1][len("HEAVY "):].replace("'", '"'))
    return "\n".join(out.splitlines()[:-1]), heavy


def test_inspect_names_the_sidecar_and_the_base_of_an_adapter_folder(trained):
    base, sidecar, adapter, _ = trained
    sha = hashlib.sha256(Path(sidecar).read_bytes()).hexdigest()
    text, heavy = _inspect(adapter)
    assert heavy == []
    assert str(Path(sidecar).resolve()) in text and sha in text and "SHA-256 matches" in text, text
    assert f"base model   {base}" in text and "SUPERTUNING" in text
    as_json, heavy = _inspect(adapter, "--json")
    summary = json.loads(as_json)
    assert heavy == [] and summary["kind"] == "sparse-adapter" and summary["sidecar_status"] == "matches"
    assert summary["record"]["sidecar"]["sha256"] == sha and summary["record"]["base_model"]["name_or_path"] == str(base)


def test_inspect_says_when_the_sidecar_changed_or_the_folder_has_no_record(trained, tmp_path):
    from click.testing import CliRunner

    from dowser_tool.cli import main

    _, sidecar, adapter, _ = trained
    copy = tmp_path / "adapter"
    copy.mkdir()
    record = json.loads((adapter / ADAPTER_RECORD).read_text())
    record["sidecar"]["sha256"] = "0" * 64
    (copy / ADAPTER_RECORD).write_text(json.dumps(record))
    (copy / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    result = CliRunner().invoke(main, ["inspect", str(copy)])
    assert result.exit_code == 0 and "SHA-256 differs" in result.output, result.output
    (copy / ADAPTER_RECORD).unlink()
    result = CliRunner().invoke(main, ["inspect", str(copy)])
    assert result.exit_code == 1 and "not made from a sidecar" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
