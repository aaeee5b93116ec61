"""Issue 22, dowser merge: inputs that used to merge with exit 0 and a wrong result end in a correct,
loadable model or a one-line refusal naming the real reason, with nothing written.

- failure 2 (kind: a tensor is restored only into a tensor of the same meaning): quantized
  checkpoints built by hand from a tiny float model: an FP8-block or bitsandbytes 8-bit FT merges
  dequantized (bit for bit against the hand-built expectation, a float config); a quantized BASE
  (any scheme) or a GPTQ / compressed-tensors FT is refused in one line naming the scheme and the
  remedy, with nothing written;
- failure 3 (kind: an adapter's update is oriented by the layout of the weight it updates): a GPT-2
  LoRA over Conv1D `attn.c_attn` (non-square) and `attn.c_proj` and a Linear untied `lm_head`,
  made with peft, merges bit for bit as peft's `merge_and_unload`, whatever the file's single
  `fan_in_fan_out` flag says;
- failure 4 (kind: the output's config describes the output's tensors): tied/untied head x
  resized/not x LoRA-on-embed_tokens/full fine-tune: `from_pretrained(OUT)` loads with no missing,
  unexpected or mismatched keys and parameters equal to the expectation, or a one-line refusal;
- "Also": LoRA bias, trainable tokens and expert LoRA are refused by their names.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dowser_tool.errors import DowserError
from dowser_tool.repair.merge import merge_checkpoint
from dowser_tool.sidecar.file import SidecarData, write_sidecar

from .models import make_llama
from .test_merge import make_mask, run_cli, same_bits, state_dict, write_adapter
from .test_reliability_merge import (
    RESTORE,
    assert_loads_as,
    assert_refused,
    merged_reference,
    peft_model,
    perturb,
    protected,
    repaired,
)


# ---- failure 2: quantized checkpoints --------------------------------------------------------
def _linears(sd):
    return [n for n in sd if n.endswith("proj.weight")]


def quantize_bnb8(sd):
    """bitsandbytes' 8-bit layout: int8 `weight`, absmax per output row `SCB`, `weight_format`."""
    out = dict(sd)
    for n in _linears(sd):
        w = sd[n].float()
        scb = w.abs().amax(dim=1)
        out[n] = torch.round(w / scb[:, None] * 127).to(torch.int8)
        out[n[: -len("weight")] + "SCB"] = scb
        out[n[: -len("weight")] + "weight_format"] = torch.tensor([0], dtype=torch.uint8)
    return out, {"quant_method": "bitsandbytes", "load_in_8bit": True}


def quantize_fp8(sd, block=(4, 4)):
    """Block-quantized FP8 (DeepSeek-V3 style): F8_E4M3 `weight` and `weight_scale_inv` per block."""
    out = dict(sd)
    for n in _linears(sd):
        w = sd[n].float()
        rows, cols = math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1])
        scale = torch.rand(rows, cols, generator=torch.Generator().manual_seed(1)) + 0.5
        full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: w.shape[0], : w.shape[1]]
        out[n] = (w / full).to(torch.float8_e4m3fn)
        out[n + "_scale_inv"] = scale
    return out, {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}


def quantize_gptq(sd):
    """GPTQ's packing: `qweight` int32 (8 nibbles each), `qzeros`, `scales`, `g_idx`; no float `weight`."""
    out = {n: t for n, t in sd.items() if n not in _linears(sd)}
    for n in _linears(sd):
        o, i = sd[n].shape
        m = n[: -len(".weight")]
        out[f"{m}.qweight"] = torch.zeros(i // 8, o, dtype=torch.int32)
        out[f"{m}.qzeros"] = torch.zeros(1, o // 8 or 1, dtype=torch.int32)
        out[f"{m}.scales"] = torch.ones(1, o, dtype=torch.float16)
        out[f"{m}.g_idx"] = torch.zeros(i, dtype=torch.int32)
    return out, {"quant_method": "gptq", "bits": 4, "group_size": -1}


def quantize_compressed(sd):
    """compressed-tensors' pack-quantized format: `weight_packed`, `weight_scale`, `weight_shape`."""
    out = {n: t for n, t in sd.items() if n not in _linears(sd)}
    for n in _linears(sd):
        o, i = sd[n].shape
        m = n[: -len(".weight")]
        out[f"{m}.weight_packed"] = torch.zeros(o, i // 8, dtype=torch.int32)
        out[f"{m}.weight_scale"] = torch.ones(o, 1, dtype=torch.bfloat16)
        out[f"{m}.weight_shape"] = torch.tensor([o, i], dtype=torch.int64)
    return out, {"quant_method": "compressed-tensors", "format": "pack-quantized"}


SCHEMES = {"bnb8": (quantize_bnb8, "bitsandbytes 8-bit"), "fp8": (quantize_fp8, "fp8 (block 4x4)"),
           "gptq": (quantize_gptq, "gptq/awq"), "compressed": (quantize_compressed, "compressed-tensors")}


def quantized_copy(src: Path, dst: Path, scheme: str, with_config=True) -> Path:
    """`src` (a float checkpoint) saved as the quantized checkpoint `scheme` would have written."""
    tensors, qc = SCHEMES[scheme][0](state_dict(src))
    dst.mkdir()
    save_file({n: t.contiguous() for n, t in tensors.items()}, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if with_config:
        config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def float_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    base = make_llama(tmp / "base", seed=0)
    ft = make_llama(tmp / "ft", seed=1)
    mask, _ = make_mask(base, tmp / "m.dowser.safetensors")
    return base, ft, mask


@pytest.mark.parametrize("scheme,which", [(s, "BASE") for s in sorted(SCHEMES)] + [("gptq", "FT"), ("compressed", "FT")])
def test_2_quantized_input_is_refused_naming_the_scheme(float_models, tmp_path, scheme, which):
    """A quantized BASE (any scheme: its protected entries would not be BASE's weights) and a GPTQ or
    compressed-tensors FT (no exact rebuild of the float weight) are refused."""
    base, ft, mask = float_models
    if which == "FT":
        ft = quantized_copy(ft, tmp_path / "ft-q", scheme)
    else:
        base = quantized_copy(base, tmp_path / "base-q", scheme)
    name = SCHEMES[scheme][1]
    assert_refused(tmp_path, base, ft, mask, f"{which} ")
    code, out = run_cli("--base", base, "--finetuned", ft, "--mask", mask, "--out", tmp_path / "out", "-q")
    assert code == 1 and name in out and "dequantize" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "out").exists()
    # the same with --dry-run and with --interpolate (no mask): refused before anything is planned
    for extra in (["--dry-run"], ["--interpolate", "0.5"]):
        args = ["--base", base, "--finetuned", ft, "--out", tmp_path / "out", "-q", *extra]
        code, out = run_cli(*args, *(["--mask", mask] if extra == ["--dry-run"] else []))
        assert code == 1 and name in out and len(out.strip().splitlines()) == 1, out
        assert not (tmp_path / "out").exists()


def test_2_quantized_tensors_without_a_quantization_config_are_still_recognised(float_models, tmp_path):
    """The FP8 weights and their scale tensors alone name the scheme (a config stripped by hand); without
    the config's block size they cannot be rebuilt, so they are refused, naming fp8."""
    base, ft, mask = float_models
    ft = quantized_copy(ft, tmp_path / "ft-q", "fp8", with_config=False)
    code, out = run_cli("--base", base, "--finetuned", ft, "--mask", mask, "--out", tmp_path / "out", "-q")
    assert code == 1 and "fp8" in out and "dequantize" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scheme,with_config", [("fp8", True), ("bnb8", True), ("bnb8", False)])
def test_2_fp8_and_bnb8_fine_tunes_merge_dequantized(tmp_path, scheme, with_config, dtype):
    """An FP8-block or bitsandbytes 8-bit FT (its other tensors in `dtype`): each weight is rebuilt as codes x
    scales (float32, `model.quant.dequantize`, written in FT's dtype), protected entries are BASE's bit for bit, the others the
    dequantized FT's bit for bit; scale tensors are gone and the config claims no quantization."""
    from dowser_tool import open_checkpoint
    from dowser_tool.model.quant import dequantize, detect
    from dowser_tool.io.layout import TORCH_TO_ST

    from .test_merge import assert_output, expected
    from .test_reliability_merge import load_checked

    base = make_llama(tmp_path / "base", seed=0)  # float32: restored entries are BASE's, cast to FT's dtype
    ft = quantized_copy(make_llama(tmp_path / "ft", seed=1, dtype=dtype), tmp_path / "ft-q", scheme, with_config)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors")
    ckpt = open_checkpoint(ft)
    q = detect(ckpt.config, {n: (TORCH_TO_ST[ckpt.dtype(n)], tuple(ckpt.shape(n))) for n in ckpt.tensor_names()})
    assert q.dequantizable and len(q.weights) == 14
    ft_float = state_dict(tmp_path / "ft")
    rebuilt = dict(ft_float)
    for n in q.weights:
        rebuilt[n] = dequantize(q, n, ckpt.read).to(dtype)
        assert (rebuilt[n].float() - ft_float[n].float()).abs().max() <= ft_float[n].float().abs().max() / 8  # one step
    merge_checkpoint(base, ft, mask, tmp_path / "out", restore=RESTORE, progress=False)
    base_sd = state_dict(base)
    assert_output(tmp_path / "out", expected(base_sd, rebuilt, stats, RESTORE))  # every tensor, bit for bit
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == str(dtype).removeprefix("torch.")
    load_checked(tmp_path / "out")  # no missing, unexpected or mismatched keys
    record = json.loads((tmp_path / "out" / "dowser_repair.json").read_text())
    assert record["finetuned"]["dequantized"] == q.scheme


def test_2_adapter_on_a_quantized_base_is_refused(float_models, tmp_path):
    base, _, mask = float_models
    adapter, _ = write_adapter(tmp_path / "adapter", state_dict(base), targets=("q_proj",))
    qbase = quantized_copy(base, tmp_path / "base-q", "fp8")
    code, out = run_cli("--base", qbase, "--finetuned", adapter, "--mask", mask, "--out", tmp_path / "out", "-q")
    assert code == 1 and "BASE " in out and "fp8" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "out").exists()


# ---- failure 3: one adapter, two weight layouts ---------------------------------------------
def make_gpt2(out: Path, seed=0, tie=False) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tie)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2_lora(tmp_path_factory):
    """A tiny untied GPT-2, a peft LoRA over attn.c_attn (Conv1D, 32x96), attn.c_proj (Conv1D, 32x32) and
    lm_head (Linear, 96x32), trained by seeded noise; peft's merge_and_unload of it; and a sidecar over
    the adapted weights in their stored layouts (tensor_info layout in_out for the Conv1D ones)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("gpt2")
    base = make_gpt2(tmp / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_attn", "attn.c_proj", "lm_head"]))
    perturb(model)
    model.save_pretrained(tmp / "adapter")
    reference = merged_reference(model)
    base_sd = state_dict(base)
    gen = torch.Generator().manual_seed(2)
    names = [n for n in base_sd if n.endswith(("attn.c_attn.weight", "attn.c_proj.weight"))] + ["lm_head.weight"]
    masks = {n: torch.rand(base_sd[n].shape, generator=gen) < 0.7 for n in names}
    info = {"base_model": {"id": str(base)}, "update_ratio": 0.3,
            "tensor_info": {n: {"layout": "out_in" if n == "lm_head.weight" else "in_out"} for n in names}}
    sidecar = write_sidecar(tmp / "m.dowser.safetensors", SidecarData(masks, info=info))
    return base, tmp / "adapter", reference, masks, sidecar


@pytest.mark.parametrize("flag", ["as saved", True, False])
def test_3_each_module_is_oriented_by_its_own_layout(gpt2_lora, tmp_path, flag):
    base, adapter, reference, masks, sidecar = gpt2_lora
    if flag != "as saved":  # the file's single flag must not matter: peft keeps it per module
        folder = tmp_path / "adapter"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        config = json.loads((adapter / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": flag}))
        adapter = folder
    merge_checkpoint(base, adapter, sidecar, tmp_path / "out", progress=False)  # the sidecar's own masks
    got, base_sd = state_dict(tmp_path / "out"), state_dict(base)
    adapted = 0
    for name, want in reference.items():
        if name in masks:  # protected entries: BASE bit for bit; trainable entries: merge_and_unload bit for bit
            assert same_bits(got[name][masks[name]], base_sd[name][masks[name]]), name
            assert same_bits(got[name][~masks[name]], want[~masks[name]]), name
            adapted += not torch.equal(want, base_sd[name])
        elif name in got:
            assert same_bits(got[name], want), name
    assert adapted == 5  # 2 x c_attn, 2 x c_proj, lm_head


@pytest.mark.parametrize("flag", [True, False])
def test_3_unknown_family_takes_the_layout_from_the_sidecar(gpt2_lora, tmp_path, flag):
    """A family transformers does not know (BASE's model_type renamed): the non-square c_attn is oriented
    by its shape, the square c_proj by the sidecar's tensor_info layout, not by the file's flag."""
    base, adapter, reference, masks, sidecar = gpt2_lora
    unknown = tmp_path / "base"
    unknown.mkdir()
    for f in base.iterdir():
        (unknown / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "dowser-test-unknown"}))
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": flag}))
    merge_checkpoint(unknown, folder, sidecar, tmp_path / "out", progress=False)
    got = state_dict(tmp_path / "out")
    for name in masks:
        assert same_bits(got[name][~masks[name]], reference[name][~masks[name]]), name


def test_3_gpt2_output_loads_as_merge_and_unload(gpt2_lora, tmp_path):
    base, adapter, reference, masks, sidecar = gpt2_lora
    merge_checkpoint(base, adapter, sidecar, tmp_path / "out", progress=False)
    base_sd = state_dict(base)
    want = {n: torch.where(masks[n], base_sd[n], v) if n in masks else v for n, v in reference.items()}
    assert_loads_as(tmp_path / "out", want)


# ---- "Also": refusals name the real reason ---------------------------------------------------
@pytest.mark.parametrize("change,message", [
    ({"lora_bias": True}, "LoRA bias (lora_bias=true) is not supported"),
    ({"trainable_token_indices": {"embed_tokens": [3, 4]}}, "trainable tokens (trainable_token_indices)"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "expert LoRA on parameters (target_parameters)"),
])
def test_also_unsupported_lora_features_are_named(float_models, tmp_path, change, message):
    base, _, mask = float_models
    adapter, _ = write_adapter(tmp_path / "adapter", state_dict(base), targets=("q_proj",))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    assert_refused(tmp_path, base, adapter, mask, message)


def test_also_a_lora_bias_tensor_is_named_even_without_the_flag(float_models, tmp_path):
    base, _, mask = float_models
    adapter, tensors = write_adapter(tmp_path / "adapter", state_dict(base), targets=("q_proj",))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key[: -len("weight")] + "bias"] = torch.zeros(tensors[key].shape[0])
    save_file(tensors, adapter / "adapter_model.safetensors")
    assert_refused(tmp_path, base, adapter, mask, "is a LoRA bias")


# ---- failure 4: the output's config describes its tensors ------------------------------------
def _fine_tune(base: Path, out: Path, kind: str, resize):
    """(FT folder or adapter folder, the fine-tuned model's parameters as transformers loads them).
    kind "lora": a LoRA with embed_tokens as a target (peft saves the embedding's base layer, resized
    or not); "full": every parameter moved and the model saved whole."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    if kind == "lora":
        model = peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
                           resize=resize)
        model.save_pretrained(out)
        return out, merged_reference(model)
    model = AutoModelForCausalLM.from_pretrained(base)
    if resize:
        torch.manual_seed(0)
        model.resize_token_embeddings(resize, mean_resizing=False)
    for p in model.parameters():
        p.requires_grad_(True)
    perturb(model)
    model.save_pretrained(out)
    return out, {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("resize", [None, 130], ids=["same-vocab", "resized"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_4_output_config_describes_its_tensors(tmp_path, tie, resize, kind):
    pytest.importorskip("peft")
    base = make_llama(tmp_path / "base", vocab=128, tie=tie)
    ft, reference = _fine_tune(base, tmp_path / "ft", kind, resize)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors")
    if kind == "lora" and resize and not tie:
        # the adapter stores the resized embedding (130 rows) but not the head, whose 130-row resized value
        # it never saved: no output can hold what the fine-tuned model computes with
        assert_refused(tmp_path, base, ft, mask, "resized")
        return
    merge_checkpoint(base, ft, mask, tmp_path / "out", restore=RESTORE, progress=False)
    base_sd = state_dict(base)
    want = {n: repaired(v, base_sd[n], protected(base_sd[n], stats[n])) if n in stats else v
            for n, v in reference.items()}
    assert_loads_as(tmp_path / "out", want)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == (resize or 128) and bool(config.get("tie_word_embeddings")) == tie


def test_also_a_fused_expert_fine_tune_is_named(tmp_path):
    """Mixtral: BASE and the mask per expert (`block_sparse_moe.experts.E.w1.weight`), FT saved by transformers 5
    with `save_original_format=False` (one fused `mlp.experts.gate_up_proj` per layer)."""
    from transformers import AutoModelForCausalLM

    from .families import build

    base = build("mixtral", tmp_path / "base")
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(tmp_path / "ft", save_original_format=False)
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in state_dict(tmp_path / "ft"))
    g = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(v.shape, generator=g) < 0.9 for k, v in state_dict(base).items() if ".experts." in k}
    mask = write_sidecar(tmp_path / "m.dowser.safetensors", SidecarData(masks, info={"update_ratio": 0.1}))
    assert_refused(tmp_path, base, tmp_path / "ft", mask, "save_original_format=False")


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_2_probe_of_a_quantized_base_is_refused_naming_the_scheme(float_models, tmp_path, scheme):
    """`dowser probe` of a quantized BASE: its codes are not weights; one line, nothing written."""
    from dowser_tool.probe.run import ProbeSettings, probe

    base = quantized_copy(float_models[0], tmp_path / "q", scheme)
    out = tmp_path / "m.dowser.safetensors"
    with pytest.raises(DowserError, match=r"quantized with .*dowser cannot probe quantized tensors as weights") as e:
        probe(str(base), str(out), settings=ProbeSettings(probes=2, probe_len=4, batch_size=2, draws=1), progress=False)
    assert "\n" not in str(e.value) and not out.exists()
    assert not list(tmp_path.glob("m.dowser*"))
