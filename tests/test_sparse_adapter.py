"""sparse_adapter: the sidecar's trainable set as a peft Super-Tuning adapter (issue 23)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from dowser_tool import DowserError, Sidecar, open_checkpoint
from dowser_tool.model.keys import KeyRules, NameMap, peft_fold
from dowser_tool.score import cut_mask, score_matrix
from dowser_tool.sidecar.file import SidecarData, write_sidecar
from dowser_tool.train.sparse import ADAPTER_RECORD, choose_sparsity, sparse_adapter

from .models import make_llama

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
W = torch.tensor([4.0, 4.0])


def llama_sidecar(model_dir, out, rho=0.1, stats=True, seed=0):
    """A sidecar over every decoder linear of a saved Llama (checkpoint names), cut from random statistics."""
    ckpt = open_checkpoint(model_dir)
    gen = torch.Generator().manual_seed(seed)
    data = SidecarData(masks={}, update_weights=W if stats else None)
    for name in ckpt.tensor_names():
        if name.endswith("proj.weight"):
            weight = ckpt.read(name)
            psi, a = torch.rand(2, weight.shape[0], generator=gen), torch.rand(2, weight.shape[1], generator=gen)
            data.masks[name] = cut_mask(score_matrix(weight, psi, a, W), rho)
            if stats:
                data.psi[name], data.a[name] = psi, a
    return write_sidecar(out, data)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # hidden 64: q 64x64, k/v 32x64, MLP 136x64: at rho 0.1 no single peft sparsity gives all three counts
    return make_llama(tmp_path_factory.mktemp("sparse") / "llama", hidden=64, layers=2)


@pytest.fixture(scope="module")
def sidecar(llama, tmp_path_factory):
    return llama_sidecar(llama, tmp_path_factory.mktemp("mask") / "llama.dowser.safetensors")


def load(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def layers(peft_model):
    """{model parameter name of the adapted weight: Super-Tuning layer}."""
    from peft.tuners.supertuning.layer import SupertuningLayer

    base = peft_model.get_base_model()
    names = {id(p): peft_fold(n)[0] for n, p in base.named_parameters()}
    return {names[id(m.get_base_layer().weight)]: m for m in base.modules() if isinstance(m, SupertuningLayer)}


def in_memory(sidecar_path, model_dir):
    """The sidecar's masks keyed by the model's parameter names (the test's own mapping, via NameMap)."""
    ckpt = open_checkpoint(model_dir)
    names = NameMap(ckpt.tensor_names(), KeyRules.of_config(ckpt.config, str(model_dir)))
    side = Sidecar(sidecar_path)
    return {names.to_canonical(n): side.mask(n) for n in side.names}


def trainable_set(mask):
    return torch.nonzero(~mask.reshape(-1)).reshape(-1)


def bits(t):
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def test_indices_are_the_trainable_set_matrix_by_matrix(llama, sidecar):
    masks = in_memory(sidecar, llama)
    adapter = sparse_adapter(load(llama), sidecar)
    got = layers(adapter)
    assert sorted(got) == sorted(masks) and len(masks) == 14
    padded = adapter.dowser_record["padding"]
    assert padded, "hidden 64 at rho 0.1 needs padding slots: this test must cover them"
    for name, mask in masks.items():
        idx = got[name].supertuning_indices["default"]
        k = int((~mask).sum())
        assert idx.dtype == torch.int32
        assert torch.equal(idx[:k].long(), trainable_set(mask)), name  # ascending, exactly the trainable set
        assert set(idx[k:].tolist()) <= set(idx[:k].tolist())  # padding repeats trainable entries only
        assert got[name].supertuning_values["default"].numel() == idx.numel()
    trainable = [n for n, p in adapter.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all("supertuning_values" in n for n in trainable)
    assert adapter.dowser_record["trainable"] == sum(int((~m).sum()) for m in masks.values())


def test_save_reload_merge_is_base_plus_values_and_bit_exact_elsewhere(llama, sidecar, tmp_path):
    from peft import PeftModel

    adapter = sparse_adapter(load(llama), sidecar)
    gen = torch.Generator().manual_seed(1)
    values = {}
    for name, layer in layers(adapter).items():
        v = layer.supertuning_values["default"]
        k = torch.unique(layer.supertuning_indices["default"]).numel()
        with torch.no_grad():
            v[:k] = torch.randn(k, generator=gen)  # padding slots stay 0, as training keeps them
        values[name] = v.detach().clone()
    adapter.save_pretrained(tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / ADAPTER_RECORD).read_text())
    assert record["sidecar"]["path"] == str(Path(sidecar).resolve())
    assert record["base_model"]["name_or_path"] == str(llama)
    assert record["modules"]["model.layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"
    reloaded = PeftModel.from_pretrained(load(llama), tmp_path / "adapter")
    for name, layer in layers(reloaded).items():
        assert torch.equal(layer.supertuning_indices["default"], layers(adapter)[name].supertuning_indices["default"])
    merged = dict(reloaded.merge_and_unload().named_parameters())
    base = dict(load(llama).named_parameters())
    masks = in_memory(sidecar, llama)
    for name, b in base.items():
        m = merged[name]
        if name not in masks:
            assert torch.equal(bits(m), bits(b)), name
            continue
        protected, idx = masks[name], trainable_set(masks[name])
        assert torch.equal(bits(m[protected]), bits(b[protected])), name
        k = idx.numel()
        assert torch.equal(m.reshape(-1)[idx], b.reshape(-1)[idx] + values[name][:k]), name


def test_bfloat16_base_keeps_protected_bits(llama, sidecar, tmp_path):
    from peft import PeftModel

    adapter = sparse_adapter(load(llama, torch.bfloat16), sidecar)
    for layer in layers(adapter).values():
        torch.nn.init.normal_(layer.supertuning_values["default"])
    adapter.save_pretrained(tmp_path / "a")
    merged = dict(PeftModel.from_pretrained(load(llama, torch.bfloat16), tmp_path / "a").merge_and_unload()
                  .named_parameters())
    base = dict(load(llama, torch.bfloat16).named_parameters())
    for name, mask in in_memory(sidecar, llama).items():
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(bits(merged[name][mask]), bits(base[name][mask])), name
        assert (merged[name][~mask] != base[name][~mask]).float().mean() > 0.9


def test_padding_slots_stay_zero_under_adamw(llama, sidecar):
    adapter = sparse_adapter(load(llama), sidecar)
    opt = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        adapter(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    checked = 0
    for name, layer in layers(adapter).items():
        v = layer.supertuning_values["default"].detach()
        pad = v.numel() - torch.unique(layer.supertuning_indices["default"]).numel()
        if pad:
            assert torch.equal(v[-pad:], torch.zeros(pad)), name
            checked += 1
        assert (v[: v.numel() - pad] != 0).float().mean() > 0.9, name
    assert checked


def test_update_ratio_recuts_from_statistics(llama, sidecar):
    model = load(llama)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = sparse_adapter(model, sidecar, update_ratio=0.3)
    side = Sidecar(sidecar)
    for name, layer in layers(adapter).items():
        expected = trainable_set(side.recut(name, weights[name], 0.3))  # llama: checkpoint name == parameter name
        assert torch.equal(layer.supertuning_indices["default"][: expected.numel()].long(), expected)
    assert adapter.dowser_record["trainable"] == sum(round(0.3 * w.numel()) for n, w in weights.items()
                                                     if n in layers(adapter))


def test_choose_sparsity_exact_when_possible_and_never_short():
    from peft.tuners.supertuning.layer import SupertuningLayer

    def peft(n, s):
        return SupertuningLayer._num_trainable(None, n, s)

    shapes = {"q": 4096 * 4096, "k": 1024 * 4096, "mlp": 11008 * 4096}  # a 7B Llama at rho 0.1: one value fits
    exact = {m: (n, round(0.1 * n)) for m, n in shapes.items()}
    s, counts = choose_sparsity(exact)
    assert counts == {m: k for m, (_, k) in exact.items()} == {m: peft(n, s) for m, (n, _) in exact.items()}
    mixed = {"a": (4096, 410), "b": (11264, 1126), "c": (100, 50)}  # no one fraction floors to all three
    s, counts = choose_sparsity(mixed)
    assert all(counts[m] >= k for m, (_, k) in mixed.items()) and counts != {m: k for m, (_, k) in mixed.items()}
    assert counts == {m: peft(n, s) for m, (n, _) in mixed.items()} and counts["c"] == 50
    full = {"a": (64, 64), "b": (32, 32)}
    assert choose_sparsity(full) == (0.0, {"a": 64, "b": 32})


def test_dict_masks_embeddings_uncovered_and_all_protected_layers(llama):
    model = load(llama)
    masks = {"model.layers.0.mlp.up_proj.weight": torch.rand(136, 64) > 0.2,
             "model.layers.1.mlp.up_proj.weight": torch.ones(136, 64, dtype=torch.bool),
             "model.embed_tokens.weight": torch.rand(96, 64) > 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = sparse_adapter(model, masks)
    assert any("model.embed_tokens.weight (Embedding.weight)" in str(w.message) for w in caught)
    record = adapter.dowser_record
    assert list(record["uncovered"]) == ["model.embed_tokens.weight"] and record["sidecar"] is None
    assert record["all_protected"] == {"model.layers.1.mlp.up_proj": "model.layers.1.mlp.up_proj.weight"}
    got = layers(adapter)
    assert list(got) == ["model.layers.0.mlp.up_proj.weight"]
    idx = got["model.layers.0.mlp.up_proj.weight"].supertuning_indices["default"].long()
    assert torch.equal(idx, trainable_set(masks["model.layers.0.mlp.up_proj.weight"]))


def test_bad_inputs_raise_one_line_errors(llama, sidecar, tmp_path):
    from peft import LoraConfig, get_peft_model

    cases = [
        (lambda: sparse_adapter(load(llama), sidecar, update_ratio=1.5), "update ratio must be in (0, 1]"),
        (lambda: sparse_adapter(load(llama), {"model.layers.9.mlp.up_proj.weight": torch.zeros(136, 64, dtype=bool)}),
         "match no parameter"),
        (lambda: sparse_adapter(load(llama), {"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 136, dtype=bool)}),
         "has shape [64, 136] in the mask but [136, 64] in the model"),
        (lambda: sparse_adapter(load(llama), {"model.layers.0.mlp.up_proj.weight": torch.ones(136, 64, dtype=bool)}),
         "no trainable entry"),
        (lambda: sparse_adapter(load(llama), {"model.layers.0.mlp.up_proj.weight": torch.zeros(136, 64, dtype=bool)},
                                update_ratio=0.1), "no score statistics"),
        (lambda: sparse_adapter(get_peft_model(load(llama), LoraConfig(target_modules=["q_proj"])), sidecar),
         "not a PEFT-wrapped one"),
        (lambda: sparse_adapter(load(llama), tmp_path / "missing.dowser.safetensors"), "no such file"),
        (lambda: sparse_adapter(load(llama), 3), "sidecar must be a path, Hub reference, Sidecar or dict, got int"),
        (lambda: sparse_adapter(load(llama), {"model.layers.0.mlp.up_proj.weight": torch.zeros(136, 64, dtype=bool)},
                                revision="main"), "revision= applies to a sidecar path or Hub reference"),
        (lambda: sparse_adapter(load(llama), Sidecar(str(sidecar)), revision="main"),
         "revision= applies to a sidecar path or Hub reference"),
    ]
    for call, message in cases:
        with pytest.raises(DowserError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_writes_an_adapter_folder_or_nothing(llama, sidecar, tmp_path):
    from click.testing import CliRunner
    from peft import PeftModel

    from dowser_tool.cli.adapter_cmd import sparse_adapter_cmd

    out = tmp_path / "adapter"
    result = CliRunner().invoke(sparse_adapter_cmd, [str(llama), str(sidecar), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 14 matrices" in result.output
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", ADAPTER_RECORD}
    assert json.loads((out / "adapter_config.json").read_text())["save_precomputed_indices"] is True
    masks = in_memory(sidecar, llama)
    for name, layer in layers(PeftModel.from_pretrained(load(llama), out)).items():
        k = int((~masks[name]).sum())
        assert torch.equal(layer.supertuning_indices["default"][:k].long(), trainable_set(masks[name]))
        assert torch.equal(layer.supertuning_values["default"], torch.zeros_like(layer.supertuning_values["default"]))
    again = CliRunner().invoke(sparse_adapter_cmd, [str(llama), str(sidecar), "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
    bad = CliRunner().invoke(sparse_adapter_cmd, [str(llama), str(sidecar), "--out", str(tmp_path / "x"),
                                                  "--update-ratio", "2"])
    assert bad.exit_code == 1 and "update ratio must be in (0, 1]" in bad.output
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]


@pytest.fixture(scope="module")
def example_mask(tmp_path_factory):
    from .models import EXAMPLE_LLAVA
    from .test_training import write_test_sidecar

    return write_test_sidecar(EXAMPLE_LLAVA, tmp_path_factory.mktemp("mask") / "tiny-llava.dowser.safetensors", rho=0.1)


@pytest.mark.parametrize("script,trainer", [("finetune_sparse_adapter.py", "Trainer"),
                                            ("finetune_sparse_trl.py", "SFTTrainer")])
def test_examples_train_with_stock_trainers_and_keep_protected_bits(script, trainer, example_llava, example_mask,
                                                                    tmp_path):
    pytest.importorskip("trl" if trainer == "SFTTrainer" else "accelerate")
    out = tmp_path / "adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(EXAMPLES / script), "--model", str(example_llava), "--mask", str(example_mask),
           "--steps", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"trained 3 steps with {trainer}" in proc.stdout
    assert "adapter entries are the sidecar's trainable entries: True" in proc.stdout
    assert "protected entries unchanged: True" in proc.stdout
    trainable = json.loads((out / ADAPTER_RECORD).read_text())["trainable"]
    assert f"{trainable}/{trainable} trainable entries moved" in proc.stdout
