"""Issue 12, dowser merge: real checkpoints whose parts disagree end in a correct, loadable model
or a one-line refusal, never in a silently dropped or arbitrarily chosen tensor.

Each numbered input of the issue is rebuilt with transformers/peft and checked by value: every
tensor of the output bit for bit against an expectation assembled by hand, and
`from_pretrained(OUT)` loading with no missing, unexpected or mismatched keys and parameters
equal to that expectation.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dowser_tool import DowserError, Sidecar
from dowser_tool.repair.merge import merge_checkpoint
from dowser_tool.probe.run import ProbeSettings, probe
from dowser_tool.score import cut_mask, score_matrix
from dowser_tool.sidecar.file import OUTPUT_HEAD, SidecarData, write_sidecar

from .models import make_llama
from .test_merge import make_mask, run_cli, same_bits, state_dict

RESTORE = 0.3


def load_checked(folder: Path):
    """from_pretrained(folder) in float32, asserting no missing/unexpected/mismatched keys."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def assert_loads_as(folder: Path, want: dict[str, torch.Tensor]):
    """The loaded model's parameters are exactly `want` (tied names included), bit for bit."""
    model = load_checked(folder)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert set(params) == set(want), set(params) ^ set(want)
    for name, value in want.items():
        assert same_bits(params[name].detach(), value), name


def assert_refused(tmp_path, base, ft, mask, message):
    """`dowser merge` exits 1 with one line containing `message`, and writes nothing."""
    code, out = run_cli("--base", base, "--finetuned", ft, "--mask", mask, "--out", tmp_path / "out", "-q")
    assert code == 1 and message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "out").exists()


def protected(base: torch.Tensor, stats, restore=RESTORE) -> torch.Tensor:
    """By hand: the top-`restore` entries of the score from statistics (psi, a, w)."""
    return cut_mask(score_matrix(base, *stats), 1 - restore)


def repaired(ft: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FT with BASE's protected entries put back in the rows both have."""
    out, rows = ft.clone(), min(ft.shape[0], base.shape[0])
    out[:rows][mask[:rows]] = base[:rows][mask[:rows]]
    return out


def perturb(model, seed=7):
    """Stand in for training: move every trainable parameter (LoRA B included) by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


def peft_model(base_dir, config, resize=None):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if resize:
        torch.manual_seed(0)
        model.resize_token_embeddings(resize, mean_resizing=False)
    model = get_peft_model(model, config)
    perturb(model)
    return model


def merged_reference(model) -> dict[str, torch.Tensor]:
    """peft's own merge_and_unload of the same model: what the adapter means."""
    merged = model.merge_and_unload()
    return {n: p.detach().clone() for n, p in merged.named_parameters(remove_duplicate=False)}


# ---- 1. LoRA adapter whose modules_to_save are resized embeddings --------------------------
def test_1_adapter_with_resized_modules_to_save_loads_with_its_vocabulary(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    base = make_llama(tmp_path / "base", vocab=128)
    model = peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                        modules_to_save=["embed_tokens", "lm_head"]), resize=130)
    model.save_pretrained(tmp_path / "adapter")
    assert load_file(tmp_path / "adapter" / "adapter_model.safetensors")["base_model.model.lm_head.weight"].shape[0] == 130
    reference = merged_reference(model)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors", extra=["lm_head.weight"])
    merge_checkpoint(base, tmp_path / "adapter", mask, tmp_path / "out", restore=RESTORE, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 130 and config["tie_word_embeddings"] is False
    base_sd = state_dict(base)
    want = dict(reference)
    for name in stats:  # lm_head: the 128 rows BASE has are repaired, the 2 new rows stay the adapter's
        want[name] = repaired(reference[name], base_sd[name], protected(base_sd[name], stats[name]))
    assert_loads_as(tmp_path / "out", want)


# ---- 2. tied head, untied fine-tune --------------------------------------------------------
@pytest.fixture(scope="module")
def tied_qwen(tmp_path_factory):
    """A tied Qwen2 BASE (no lm_head.weight in its file), probed with --include lm_head, and an
    untied fine-tune: peft merge_and_unload of modules_to_save=[embed_tokens, lm_head]."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    tmp = tmp_path_factory.mktemp("tied")
    base = make_llama(tmp / "base", tie=True, model_type="qwen2")
    assert "lm_head.weight" not in state_dict(base)
    sidecar = tmp / "m.dowser.safetensors"
    probe(str(base), str(sidecar), settings=ProbeSettings(probes=4, probe_len=6, batch_size=2, draws=2,
                                                          include=("lm_head",)), progress=False)
    model = peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    model.merge_and_unload().save_pretrained(tmp / "ft")
    ft_sd = state_dict(tmp / "ft")
    assert "lm_head.weight" in ft_sd and not torch.equal(ft_sd["lm_head.weight"], ft_sd["model.embed_tokens.weight"])
    return base, tmp / "ft", sidecar


def expected_tied_repair(base, ft, sidecar_path):
    """By hand: every sidecar mask re-cut from its statistics; the head's goes into FT's lm_head."""
    side = Sidecar(sidecar_path)
    base_sd, ft_sd = state_dict(base), state_dict(ft)
    want = dict(ft_sd)
    for name in side.names:
        psi, a, w = side.stats(name)
        target = "lm_head.weight" if name == "model.embed_tokens.weight" else name
        want[target] = repaired(ft_sd[target], base_sd[name], protected(base_sd[name], (psi, a, w)))
    return want


def test_2_probe_records_the_tied_head_role(tied_qwen):
    base, _, sidecar = tied_qwen
    side = Sidecar(sidecar)
    assert side.version == 2 and side.metadata["roles"] == {"model.embed_tokens.weight": OUTPUT_HEAD}
    assert side.roles == {"model.embed_tokens.weight": OUTPUT_HEAD}


@pytest.mark.parametrize("variant", ["untied-config", "config-still-tied", "version-1-sidecar"])
def test_2_tied_head_mask_repairs_the_untied_head(tied_qwen, tmp_path, variant):
    base, ft, sidecar = tied_qwen
    if variant == "config-still-tied":  # both tensors stored, different, config says tied
        ft = Path(shutil.copytree(ft, tmp_path / "ft"))
        config = json.loads((ft / "config.json").read_text())
        (ft / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    if variant == "version-1-sidecar":  # as written before roles existed: still read, role inferred
        data = Sidecar(sidecar).read_all()
        data.roles = {}
        sidecar = write_sidecar(tmp_path / "v1.dowser.safetensors", data)
        raw = bytearray(sidecar.read_bytes())
        header = raw[8:8 + int.from_bytes(raw[:8], "little")].decode()
        old = header.replace('"format_version":"2"', '"format_version":"1"').replace('"roles":"{}",', '')
        assert len(old) < len(header)
        old += " " * (len(header) - len(old))  # same length: tensor offsets unchanged
        raw[8:8 + len(header)] = old.encode()
        sidecar.write_bytes(bytes(raw))
        assert Sidecar(sidecar).version == 1
    merge_checkpoint(base, ft, sidecar, tmp_path / "out", restore=RESTORE, progress=False)
    want = expected_tied_repair(base, ft, sidecar)
    assert_loads_as(tmp_path / "out", want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    # FT's input embedding is untouched; every protected head entry is BASE's
    side = Sidecar(sidecar)
    mask = protected(state_dict(base)["model.embed_tokens.weight"], side.stats("model.embed_tokens.weight"))
    out = state_dict(tmp_path / "out")
    assert same_bits(out["model.embed_tokens.weight"], state_dict(ft)["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"][mask], state_dict(base)["model.embed_tokens.weight"][mask])


def test_2_shared_head_stored_twice_stays_one_value(tmp_path):
    """A tied FT that stores the head too, bit-equal: both names take the head's mask and stay tied."""
    base = make_llama(tmp_path / "base", tie=True, model_type="qwen2")
    ft = make_llama(tmp_path / "ft", seed=1, tie=True, model_type="qwen2")
    sd = state_dict(ft)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, ft / "model.safetensors", {"format": "pt"})
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors", extra=["model.embed_tokens.weight"])
    data = Sidecar(mask).read_all()
    data.roles = {"model.embed_tokens.weight": OUTPUT_HEAD}
    write_sidecar(mask, data)
    merge_checkpoint(base, ft, mask, tmp_path / "out", restore=RESTORE, progress=False)
    base_sd = state_dict(base)
    head = repaired(sd["model.embed_tokens.weight"], base_sd["model.embed_tokens.weight"],
                    protected(base_sd["model.embed_tokens.weight"], stats["model.embed_tokens.weight"]))
    out = state_dict(tmp_path / "out")
    assert same_bits(out["lm_head.weight"], head) and same_bits(out["model.embed_tokens.weight"], head)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_2_roles_that_contradict_the_base_are_refused(tmp_path):
    base = make_llama(tmp_path / "base")
    ft = make_llama(tmp_path / "ft", seed=1)
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors", extra=["model.embed_tokens.weight"])
    data = Sidecar(mask).read_all()
    data.roles = {"model.embed_tokens.weight": OUTPUT_HEAD}  # BASE is untied: its head is lm_head.weight
    write_sidecar(mask, data)
    assert_refused(tmp_path, base, ft, mask, "recorded as the mask of the output_head")
    with pytest.raises(DowserError, match="role 'head' of"):
        write_sidecar(tmp_path / "bad.dowser.safetensors", SidecarData(masks=data.masks, roles={
            "model.embed_tokens.weight": "head"}))


# ---- 3. a folder with both model.safetensors and a sharded index --------------------------
def test_3_single_file_wins_over_a_leftover_index_as_in_transformers(tmp_path):
    base = make_llama(tmp_path / "base")
    ft = make_llama(tmp_path / "ft", seed=1)
    stale = make_llama(tmp_path / "stale", seed=2, shard_size="40KB")  # an earlier save, sharded
    for f in stale.glob("model*"):
        shutil.copy(f, ft / f.name)
    assert (ft / "model.safetensors").exists() and (ft / "model.safetensors.index.json").exists()
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors")
    merge_checkpoint(base, ft, mask, tmp_path / "out", restore=RESTORE, progress=False)
    from transformers import AutoModelForCausalLM

    loaded = dict(AutoModelForCausalLM.from_pretrained(ft).named_parameters(remove_duplicate=False))
    single = load_file(ft / "model.safetensors")
    assert all(same_bits(loaded[n].detach(), single[n]) for n in single)  # transformers read the single file
    base_sd = state_dict(base)
    want = {n: repaired(v, base_sd[n], protected(base_sd[n], stats[n])) if n in stats else v for n, v in single.items()}
    assert_loads_as(tmp_path / "out", want)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]


@pytest.mark.parametrize("lie", ["wrong-shard", "unlisted", "listed-absent"])
def test_3_index_that_disagrees_with_its_shards_is_refused(tmp_path, lie):
    base = make_llama(tmp_path / "base")
    ft = make_llama(tmp_path / "ft", seed=1, shard_size="40KB")
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    name = "model.layers.1.mlp.up_proj.weight"
    if lie == "wrong-shard":
        weight_map[name] = next(s for s in shards if s != weight_map[name])
    elif lie == "unlisted":
        del weight_map[name]
    else:
        weight_map["model.layers.9.mlp.up_proj.weight"] = shards[0]
    (ft / "model.safetensors.index.json").write_text(json.dumps(index))
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors")
    assert_refused(tmp_path, base, ft, mask, "the index and its shards disagree")


def test_3_adapter_and_full_model_in_one_folder_is_refused(tmp_path):
    base = make_llama(tmp_path / "base")
    ft = make_llama(tmp_path / "ft", seed=1)
    (ft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors")
    assert_refused(tmp_path, base, ft, mask, "holds both a LoRA adapter")


# ---- 4. LoRA with embed_tokens as a target ------------------------------------------------
@pytest.mark.parametrize("resize", [None, 130])
def test_4_lora_on_the_embedding_merges_as_merge_and_unload(tmp_path, resize):
    pytest.importorskip("peft")
    from peft import LoraConfig

    base = make_llama(tmp_path / "base", vocab=128)
    model = peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                        modules_to_save=["lm_head"] if resize else None), resize=resize)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # peft's default save
    reference = merged_reference(model)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors")
    merge_checkpoint(base, tmp_path / "adapter", mask, tmp_path / "out", restore=RESTORE, progress=False)
    base_sd = state_dict(base)
    want = {n: repaired(v, base_sd[n], protected(base_sd[n], stats[n])) if n in stats else v
            for n, v in reference.items()}
    assert_loads_as(tmp_path / "out", want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == (resize or 128)


# ---- beyond the inputs: other disagreements --------------------------------------------------
def test_adapter_with_two_keys_for_one_tensor_is_refused(tmp_path):
    base = make_llama(tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    head = state_dict(base)["lm_head.weight"]
    # a modules_to_save copy saved under both keys peft uses when it saves embedding layers, disagreeing
    save_file({"base_model.model.lm_head.weight": head + 1, "base_model.model.lm_head.modules_to_save.weight":
               head + 2}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors")
    assert_refused(tmp_path, base, adapter, mask, "both hold 'lm_head.weight', with different values")


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq", "something-new"])
def test_adapter_trained_on_a_residual_base_is_refused(tmp_path, init):
    from .test_merge import write_adapter

    base = make_llama(tmp_path / "base")
    adapter, _ = write_adapter(tmp_path / "adapter", state_dict(base), targets=("q_proj",))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors")
    assert_refused(tmp_path, base, adapter, mask, "rewrote the base layer")


def test_config_that_unties_a_head_it_does_not_store_is_refused(tmp_path):
    base = make_llama(tmp_path / "base", tie=True, model_type="qwen2")
    ft = make_llama(tmp_path / "ft", seed=1, tie=True, model_type="qwen2")
    config = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors")
    assert_refused(tmp_path, base, ft, mask, "config and the tensors disagree")


def test_config_dtype_follows_the_tensors_written(tmp_path):
    base = make_llama(tmp_path / "base")
    ft = make_llama(tmp_path / "ft", seed=1, dtype=torch.bfloat16)
    config = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))  # says float32, stores bf16
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors")
    merge_checkpoint(base, ft, mask, tmp_path / "out", restore=RESTORE, progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_result_does_not_depend_on_tensor_order_in_the_file(tmp_path):
    from dowser_tool.io.layout import TORCH_TO_ST, StreamingWriter

    base = make_llama(tmp_path / "base")
    ft = make_llama(tmp_path / "ft", seed=1)
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors", extra=["lm_head.weight"])
    backwards = Path(shutil.copytree(ft, tmp_path / "ft-backwards"))
    sd = load_file(ft / "model.safetensors")
    names = sorted(sd, reverse=True)
    with StreamingWriter(backwards / "model.safetensors", [(n, TORCH_TO_ST[sd[n].dtype], tuple(sd[n].shape))
                                                           for n in names], {"format": "pt"}) as w:
        for n in names:
            w.write(n, sd[n])
    merge_checkpoint(base, ft, mask, tmp_path / "a", progress=False)
    merge_checkpoint(base, backwards, mask, tmp_path / "b", progress=False)
    a, b = state_dict(tmp_path / "a"), state_dict(tmp_path / "b")
    assert set(a) == set(b) and all(same_bits(a[n], b[n]) for n in a)


def test_mask_from_another_model_of_the_same_shapes_is_refused(tmp_path):
    """Two models of one architecture, different weights: the probe fingerprints each weight it
    scored, and merge refuses a BASE whose weights are not those (whatever its path), or warns
    and merges with --force."""
    from dowser_tool.sidecar.file import weight_fingerprint

    probed = make_llama(tmp_path / "probed", seed=0)
    other = make_llama(tmp_path / "other", seed=1)
    sidecar = tmp_path / "m.dowser.safetensors"
    probe(str(probed), str(sidecar), settings=ProbeSettings(probes=4, probe_len=6, draws=2), progress=False)
    side = Sidecar(sidecar)
    stored = state_dict(probed)
    for name in side.shapes:
        assert side.fingerprint(name) == weight_fingerprint(stored[name])

    args = ["--base", other, "--finetuned", other, "--mask", sidecar, "-q"]
    code, output = run_cli(*args, "--out", tmp_path / "out")
    assert code == 1 and "is not the weight the mask was probed on" in output, output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    code, output = run_cli(*args, "--out", tmp_path / "forced", "--force")
    assert code == 0 and output.count("merging anyway (--force)") == 1, output
    code, output = run_cli("--base", probed, "--finetuned", other, "--mask", sidecar, "-q", "--out", tmp_path / "ok")
    assert code == 0 and "fingerprint" not in output, output
