"""A composite mixture-of-experts checkpoint's sidecar on its language model loaded alone (issue 21, item 7).

A LLaVA whose language model is a Mixtral (experts saved per expert under the legacy names
`block_sparse_moe.experts.N.w1/w2/w3`) or a Qwen3-MoE (`mlp.experts.N.gate_proj/up_proj/down_proj`) is probed;
its language model, saved and loaded on its own as a causal LM, holds those experts fused into 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) under another prefix. `protect(llm, mask)` maps the
prefix for expert masks as for dense ones: every expert slice protects exactly the sidecar's entries (the
entries three AdamW steps with weight decay leave bit-identical are exactly the protected ones, expert by
expert), re-cut per expert at another ratio; another language model of the same shapes (fingerprints) and
one whose experts differ in shape are refused in one line. A Qwen3-VL-MoE checkpoint (3-D expert stacks stored
transposed, (experts, in, out)) protects its text model loaded alone the same way, and one expert of one stack
with other weights is refused (its fingerprint); so is one expert with other weights among per-expert tensors
(the probe records each expert's fingerprint).
"""

from __future__ import annotations

import re

import pytest
import torch

from dowser_tool import DowserError, Sidecar, protect
from dowser_tool.probe.run import ProbeSettings, probe
from dowser_tool.score import trainable_count

from .families import (
    _clip_vision,
    _ids,
    _llama2_tok,
    _processor,
    _qwen_tok,
    _text_sub,
    _vlm,
    build,
)

RHO = 0.25
SETTINGS = {"probes": 2, "probe_len": 6, "batch_size": 2, "draws": 1, "update_ratio": RHO}
TEXT = {  # text model_type -> the MoE part of its config (4 experts, top-2)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "mlp_only_layers": [0],
                  "norm_topk_prob": True},
}
EXPERT = re.compile(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)"
                    r"\.weight$")


def build_llava_moe(text: str, out, seed: int = 0):
    """A tiny LLaVA (CLIP tower, as tests/families.py's llava) whose language model is the MoE `text`."""
    from transformers import CLIPImageProcessor

    tok = _llama2_tok(["<image>"], chat_template=None) if text == "mixtral" else _qwen_tok(["<image>"])
    ip = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = _processor("LlavaProcessor", image_processor=ip, tokenizer=tok, patch_size=8,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return _vlm("llava", tok, proc, out, seed, text_config=_text_sub(text, tok, **TEXT[text]),
                vision_config=_clip_vision(), image_token_index=_ids(tok, image="<image>")["image"],
                image_seq_length=4, vision_feature_layer=-2, vision_feature_select_strategy="default")


def language_model_alone(folder, out):
    """The composite's language model saved on its own (causal LM of the text config, the composite's
    decoder and head weights) and loaded back with AutoModelForCausalLM."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )

    vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder).text_config).float()
    llm.model.load_state_dict(vlm.model.language_model.state_dict())
    llm.lm_head.load_state_dict(vlm.lm_head.state_dict())
    llm.save_pretrained(out)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def where(name: str, prefix: str, sc: Sidecar, own: str = "model.") -> tuple[str, tuple]:
    """The parameter of the model alone (and the index into it) holding sidecar tensor `name`: a per-expert
    tensor is expert E of the fused gate_up_proj (gate rows first, then up) or down_proj."""
    m = EXPERT.search(name)
    if m is None:
        return own + name[len(prefix):], ()
    layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
    if proj in ("w2", "down_proj"):
        return f"{own}layers.{layer}.mlp.experts.down_proj", (e,)
    rows = sc.shapes[name][0]
    first = proj in ("w1", "gate_proj")
    return f"{own}layers.{layer}.mlp.experts.gate_up_proj", (e, slice(0, rows) if first else slice(rows, 2 * rows))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def train(model, handle, loss_of, steps: int = 3) -> dict[str, torch.Tensor]:
    """Three AdamW steps with weight decay (which moves every trainable entry); then `handle.changed() == []`."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, ids).backward()
        opt.step()
    assert handle.changed() == []
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def lm_loss(model, ids):
    return model(input_ids=ids).logits.float().pow(2).mean()


def assert_exact(sc: Sidecar, placed: dict, before: dict, after: dict, ratio: float | None = None) -> dict:
    """For every sidecar tensor (`placed`: {sidecar name: (parameter, index, stored transposed)}): the entries
    that did not move are exactly the sidecar's protected entries (at `ratio`: exactly round(ratio * numel)
    moved, per expert slice); protected entries are bit-identical. Returns {sidecar name: protected count}."""
    counts = {}
    for name, (param, index, flip) in placed.items():
        b, a = before[param][index], after[param][index]
        if flip:
            b, a = b.transpose(-1, -2), a.transpose(-1, -2)
        kept = bits(a) == bits(b)
        slices = list(zip(kept, sc.mask(name))) if kept.dim() == 3 else [(kept, sc.mask(name))]
        for k, m in slices:  # each expert of a 3-D stack on its own
            if ratio is None:
                assert torch.equal(k, m), name  # protected = unmoved, entry for entry
                assert int(k.sum()) == int(m.sum()) == m.numel() - trainable_count(m.numel(), RHO), name
            else:
                assert int((~k).sum()) == trainable_count(k.numel(), ratio), name
        counts[name] = int(kept.sum())
    return counts


@pytest.fixture(scope="module", params=list(TEXT))
def composite(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"llava-{request.param}")
    folder = build_llava_moe(request.param, root / "vlm")
    mask = root / "vlm.dowser.safetensors"
    probe(str(folder), str(mask), settings=ProbeSettings(**SETTINGS), progress=False)
    return root, folder, mask


def expected_places(sc: Sidecar) -> tuple[dict, int]:
    prefix = "language_model.model."
    assert all(n.startswith(prefix) for n in sc.names)
    places = {n: (*where(n, prefix, sc), False) for n in sc.names}
    experts = [n for n in sc.names if EXPERT.search(n)]
    assert len(experts) >= 12 and {places[n][0].rsplit(".", 1)[1] for n in experts} == {"gate_up_proj", "down_proj"}
    return places, len(experts)


def test_composite_expert_masks_protect_the_language_model_alone(composite, tmp_path):
    _, folder, mask = composite
    sc = Sidecar(mask)
    places, n_experts = expected_places(sc)
    llm = language_model_alone(folder, tmp_path / "llm").train()
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    handle = protect(llm, mask)
    assert set(handle.names) == {param for param, _, _ in places.values()}
    assert handle.protected == sum(int(sc.mask(n).sum()) for n in sc.names)
    fused = {g.name: g.mask for g in handle._guards if g.mask.dim() == 3}
    for name, (param, index, _) in places.items():
        if index:  # the guard's mask holds the sidecar's expert mask in that expert's rows
            assert torch.equal(fused[param][index], sc.mask(name)), name
    after = train(llm, handle, lm_loss)
    counts = assert_exact(sc, places, before, after)
    assert len(counts) == len(sc.names) and sum(counts.values()) == handle.protected
    assert sum(1 for n in counts if EXPERT.search(n)) == n_experts


def test_composite_expert_masks_recut_per_expert(composite, tmp_path):
    _, folder, mask = composite
    sc = Sidecar(mask)
    places, _ = expected_places(sc)
    llm = language_model_alone(folder, tmp_path / "llm").train()
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    handle = protect(llm, mask, update_ratio=0.5)
    after = train(llm, handle, lm_loss)
    assert_exact(sc, places, before, after, ratio=0.5)


def test_another_language_model_of_the_same_shapes_is_refused(composite, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, folder, mask = composite
    torch.manual_seed(3)
    other = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder).text_config).float()
    with pytest.raises(DowserError, match="fingerprint differs") as err:
        protect(other, mask)
    assert "\n" not in str(err.value) and "('language_model.model.layers.0." in str(err.value)


def test_a_language_model_with_one_other_expert_is_refused(composite, tmp_path):
    """Only one expert's weights differ (same shapes, same dense weights): its recorded fingerprint refuses it."""
    _, folder, mask = composite
    llm = language_model_alone(folder, tmp_path / "llm")
    fused = next(p for n, p in llm.named_parameters() if n.endswith("mlp.experts.down_proj"))
    with torch.no_grad():
        fused[2].mul_(1.5)
    with pytest.raises(DowserError, match="fingerprint differs") as err:
        protect(llm, mask)
    assert "\n" not in str(err.value) and re.search(r"experts\.2\.(w2|down_proj)\.weight", str(err.value)), err.value


def test_a_language_model_with_other_expert_shapes_is_refused(composite, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, folder, mask = composite
    llm = language_model_alone(folder, tmp_path / "llm")
    cfg = AutoConfig.from_pretrained(tmp_path / "llm")
    cfg.num_local_experts = cfg.num_experts = 3  # same attention weights, one expert fewer
    other = AutoModelForCausalLM.from_config(cfg).float()
    shapes = {k: v.shape for k, v in other.state_dict().items()}
    other.load_state_dict({k: v for k, v in llm.state_dict().items() if v.shape == shapes[k]}, strict=False)
    with pytest.raises(DowserError, match="make 4 experts") as err:
        protect(other, mask)
    assert "\n" not in str(err.value) and "[3, " in str(err.value)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """Qwen3-VL-MoE as the Hub stores it: 3-D stacks (experts, in, out) under model.language_model., probed."""
    root = tmp_path_factory.mktemp("qwen3-vl-moe")
    folder = build("qwen3_vl_moe_hub", root / "vlm")
    mask = root / "vlm.dowser.safetensors"
    probe(str(folder), str(mask), settings=ProbeSettings(**SETTINGS), progress=False)
    return folder, mask


def text_model_alone(folder):
    """Its text model on its own (Qwen3VLMoeTextModel: stacks held (experts, out, in), under no prefix)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
        Qwen3VLMoeTextModel,
    )

    vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    text = Qwen3VLMoeTextModel(AutoConfig.from_pretrained(folder).text_config).float()
    text.load_state_dict(vlm.model.language_model.state_dict())
    return text


def test_stored_expert_stacks_protect_the_text_model_alone(stacks):
    folder, mask = stacks
    sc = Sidecar(mask)
    prefix = "model.language_model."
    stacked = [n for n in sc.names if sc.mask(n).dim() == 3]
    assert len(stacked) == 4 and all(n.startswith(prefix) for n in sc.names)
    text = text_model_alone(folder).train()
    params = dict(text.named_parameters())
    places = {n: (n[len(prefix):], (), n in stacked) for n in sc.names}
    for n in stacked:  # stored transposed: the mask's shape is the parameter's, last two dimensions swapped
        assert tuple(params[places[n][0]].transpose(1, 2).shape) == tuple(sc.shapes[n]) != tuple(params[places[n][0]].shape)
    before = {n: p.detach().clone() for n, p in params.items()}
    handle = protect(text, mask)
    assert set(handle.names) == {p for p, _, _ in places.values()}
    assert handle.protected == sum(int(sc.mask(n).sum()) for n in sc.names)
    after = train(text, handle, lambda m, ids: m(input_ids=ids).last_hidden_state.pow(2).mean())
    counts = assert_exact(sc, places, before, after)
    assert sum(counts[n] for n in stacked) == sum(int(sc.mask(n).sum()) for n in stacked)


def test_a_text_model_whose_expert_stack_differs_is_refused(stacks):
    folder, mask = stacks
    text = text_model_alone(folder)
    with torch.no_grad():
        text.layers[1].mlp.experts.gate_up_proj[2].mul_(1.5)  # one expert of one stack: other weights
    with pytest.raises(DowserError, match="fingerprint differs") as err:
        protect(text, mask)
    assert "\n" not in str(err.value) and "'layers.1.mlp.experts.gate_up_proj'" in str(err.value)


def test_composite_moe_sidecar_makes_a_sparse_adapter_of_the_language_model_alone(composite, tmp_path):
    """`sparse_adapter` maps names as `protect` does: every dense linear mask of the composite reaches the language
    model alone with exactly its trainable entries; the per-expert masks (fused 3-D parameters there) are listed as
    uncovered, not refused."""
    from dowser_tool import sparse_adapter

    _, folder, mask = composite
    sc = Sidecar(mask)
    llm = language_model_alone(folder, tmp_path / "llm")
    with pytest.warns(UserWarning):
        adapter = sparse_adapter(llm, mask)
    record = adapter.dowser_record
    dense = [n for n in sc.names if not EXPERT.search(n)]
    assert sorted(record["modules"].values()) == sorted(dense)
    assert set(record["uncovered"]) == {n for n in sc.names if EXPERT.search(n)}
    assert record["trainable"] == sum(int((~sc.mask(n)).sum()) for n in dense)
    assert sum(p.numel() for p in adapter.parameters() if p.requires_grad) >= record["trainable"]
