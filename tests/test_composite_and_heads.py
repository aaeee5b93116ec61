"""One sidecar, every way the model is loaded; heads that are not the LM head (issue 21, items 7 and 8).

- A sidecar probed on a composite checkpoint (NVILA's `llm.*` keys, a LLaVA's language model) applies to that
  language model loaded on its own: `protect` maps the prefix when shapes and fingerprints agree, keeps every
  protected entry bit-identical through AdamW, and refuses a model whose weights differ; `dowser merge` of an
  LLM-only fine-tune with the composite's sidecar restores exactly the masked entries.
- A reward model (`Qwen2ForSequenceClassification`, a `score` head) fine-tuned from a Qwen2 causal-LM BASE merges:
  decoder tensors repaired bit-exactly, the fine-tune's own head and config kept, the output loads with its own
  class; a mask over `lm_head` applied to it is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dowser_tool import DowserError, Sidecar, open_checkpoint, protect
from dowser_tool.probe.run import ProbeSettings, probe
from dowser_tool.repair.merge import merge_checkpoint
from dowser_tool.score import trainable_count

from .families import build, build_qwen2_reward
from .test_expert_stacks import _train_protected
from .test_family_matrix import same_bits

RHO = 0.25
SETTINGS = dict(probes=4, probe_len=8, batch_size=2, draws=2, update_ratio=RHO)


def assert_protect_exact(model, mask, expect: dict[str, str]):
    """protect(model, mask) covers the parameters `expect` names ({sidecar name: parameter}) with the sidecar's
    masks and keeps their protected entries bit-identical through three AdamW steps with weight decay."""
    sc = Sidecar(mask)
    handle, before, now = _train_protected(model.train(), mask)
    assert set(expect.values()) <= set(handle.names)
    for name, param in expect.items():
        m = sc.mask(name)
        assert torch.equal(now[param].detach()[m], before[param][m]), name  # protected: BASE's values
        assert not torch.equal(now[param].detach()[~m], before[param][~m]), name  # trainable: trained


@pytest.fixture(scope="module")
def nvila(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvila")
    base = build("nvila_folder", root / "base")
    mask = root / "nvila.dowser.safetensors"
    probe(str(base), str(mask), settings=ProbeSettings(include=("lm_head",), **SETTINGS), progress=False)
    return root, base, mask


def test_nvila_sidecar_protects_its_llm_loaded_alone(nvila):
    from transformers import Qwen2ForCausalLM

    root, base, mask = nvila
    sc = Sidecar(mask)
    assert all(n.startswith("llm.") for n in sc.names)
    model = Qwen2ForCausalLM.from_pretrained(base / "llm", dtype=torch.float32)
    expect = {n: n[len("llm."):] for n in sc.names if "layers" in n}
    assert_protect_exact(model, mask, expect)


def test_nvila_sidecar_refuses_another_llm_of_the_same_shapes(nvila):
    from transformers import Qwen2ForCausalLM

    root, base, mask = nvila
    other = build("nvila_folder", root / "other", seed=3)
    model = Qwen2ForCausalLM.from_pretrained(other / "llm", dtype=torch.float32)
    with pytest.raises(DowserError, match="fingerprint differs"):
        protect(model, mask)


def test_nvila_sidecar_merges_an_llm_only_fine_tune(nvila, tmp_path):
    root, base, mask = nvila
    ft = build("nvila_folder", tmp_path / "ft", seed=1) / "llm"  # the LLM fine-tuned alone, saved on its own
    out = tmp_path / "out"
    merge_checkpoint(base / "llm", ft, mask, out, update_ratio=RHO, progress=False)
    sc, b, f, got = Sidecar(mask), open_checkpoint(base / "llm"), open_checkpoint(ft), open_checkpoint(out)
    assert set(got.tensor_names()) == set(f.tensor_names())
    masked = {n[len("llm."):]: sc.mask(n) for n in sc.names}
    assert set(masked) <= set(f.tensor_names())
    for n in f.tensor_names():
        want = torch.where(masked[n], b.read(n), f.read(n)) if n in masked else f.read(n)
        assert same_bits(got.read(n), want), n


def llava_language_model(folder):
    """The LLaVA family's language model as a text trainer loads it: LlamaForCausalLM from the text config, holding
    the LLaVA checkpoint's language-model weights; and the checkpoint's key prefix of that model."""
    from transformers import AutoConfig, LlamaForCausalLM

    sd = load_file(str(folder / "model.safetensors"))
    prefix = next(p for p in ("model.language_model.", "language_model.model.") if any(k.startswith(p) for k in sd))
    llm = LlamaForCausalLM(AutoConfig.from_pretrained(folder).text_config).float()
    own = {"model." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    own["lm_head.weight"] = next(v for k, v in sd.items() if k.endswith("lm_head.weight"))
    missing, unexpected = llm.load_state_dict(own, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return llm, prefix


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    folder = build("llava", root / "llava")
    mask = root / "llava.dowser.safetensors"
    probe(str(folder), str(mask), settings=ProbeSettings(include=("lm_head",), **SETTINGS), progress=False)
    return root, folder, mask


def test_llava_sidecar_protects_its_language_model_loaded_alone(llava):
    root, folder, mask = llava
    llm, prefix = llava_language_model(folder)
    sc = Sidecar(mask)
    expect = {n: "model." + n[len(prefix):] for n in sc.names if n.startswith(prefix)}
    assert expect
    assert_protect_exact(llm, mask, expect)


def test_llava_sidecar_merges_a_fine_tune_of_its_language_model_alone(llava, tmp_path):
    root, folder, mask = llava
    llm, prefix = llava_language_model(folder)
    llm.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in llm.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
    llm.save_pretrained(tmp_path / "ft")
    merge_checkpoint(tmp_path / "base", tmp_path / "ft", mask, tmp_path / "out", update_ratio=RHO, progress=False)
    sc, b, f, got = Sidecar(mask), *(open_checkpoint(tmp_path / d) for d in ("base", "ft", "out"))
    def own_name(n):  # the language model's name for a LLaVA key: its head by role, the rest by prefix
        return "lm_head.weight" if sc.roles.get(n) == "output_head" else "model." + n[len(prefix):]

    masked = {own_name(n): sc.mask(n) for n in sc.names}
    assert "lm_head.weight" in masked and len(masked) == len(sc.names)
    assert set(got.tensor_names()) == set(f.tensor_names()) and set(masked) <= set(f.tensor_names())
    for n in f.tensor_names():
        want = torch.where(masked[n], b.read(n), f.read(n)) if n in masked else f.read(n)
        assert same_bits(got.read(n), want), n


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    base = build("qwen2", root / "base")
    ft = build_qwen2_reward(base, root / "ft")
    return root, base, ft


def test_reward_model_fine_tune_merges_with_its_own_head(reward, tmp_path):
    from transformers import AutoModelForSequenceClassification, Qwen2ForSequenceClassification

    root, base, ft = reward
    mask = tmp_path / "m.dowser.safetensors"
    probe(str(base), str(mask), settings=ProbeSettings(**SETTINGS), progress=False)
    sc = Sidecar(mask)
    for n in sc.names:
        assert int((~sc.mask(n)).sum()) == trainable_count(sc.mask(n).numel(), RHO), n
    out = tmp_path / "out"
    merge_checkpoint(base, ft, mask, out, update_ratio=RHO, progress=False)
    b, f, got = open_checkpoint(base), open_checkpoint(ft), open_checkpoint(out)
    assert set(got.tensor_names()) == set(f.tensor_names()) and "score.weight" in f.tensor_names()
    for n in f.tensor_names():
        want = torch.where(sc.mask(n), b.read(n), f.read(n)) if n in sc.names else f.read(n)
        assert same_bits(got.read(n), want), n
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForSequenceClassification"]
    model, info = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert isinstance(model, Qwen2ForSequenceClassification) and not any(info.values()), info
    assert same_bits(model.score.weight.detach(), f.read("score.weight"))


def test_lm_head_mask_on_a_reward_model_is_refused_in_one_line(reward, tmp_path):
    root, base, ft = reward
    mask = tmp_path / "mh.dowser.safetensors"
    probe(str(base), str(mask), settings=ProbeSettings(include=("lm_head",), **SETTINGS), progress=False)
    with pytest.raises(DowserError) as err:
        merge_checkpoint(base, ft, mask, tmp_path / "out", update_ratio=RHO, progress=False)
    assert "\n" not in str(err.value) and "lm_head" in str(err.value)
    assert not (tmp_path / "out").exists()
