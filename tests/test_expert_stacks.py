"""Experts stored in one 3-D tensor are scored per expert (issue 21, item 2).

GPT-OSS stores each layer's experts fused on disk, (experts, in, out) per expert; Qwen3-VL-MoE
checkpoints store (experts, in, out) and transformers' loading converter transposes them to the
model's (experts, out, in). Each stack is scored as stored: its experts' statistics from the tokens
routed to each (equal to an in-memory oracle with one Linear per expert, expert by expert), one mask
of the stored shape with exactly round(rho * numel) trainable entries per expert slice; merge and
protect keep protected entries bit for bit; an expert no probe token reaches is listed in the
sidecar and by `dowser inspect`.
"""

import pytest
import torch
from click.testing import CliRunner

from dowser_tool import Sidecar, open_checkpoint, protect
from dowser_tool.cli import main
from dowser_tool.model.experts import is_stack
from dowser_tool.probe.run import ProbeRun, ProbeSettings, probe
from dowser_tool.repair.merge import merge_checkpoint
from dowser_tool.score import cut_mask, score_matrix, trainable_count

from .families import build
from .oracle_experts import stack_oracle
from .test_family_matrix import same_bits

RHO = 0.25
STACKS = {  # family -> (a stack key of layer 0, stored (in, out) per expert)
    "gpt_oss": ("model.layers.0.mlp.experts.gate_up_proj", True),
    "llama4_text": ("model.layers.1.feed_forward.experts.gate_up_proj", True),
    "qwen3_vl_moe": ("model.language_model.layers.0.mlp.experts.gate_up_proj", False),
    "qwen3_vl_moe_hub": ("model.language_model.layers.0.mlp.experts.gate_up_proj", True),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stacks")
    return lambda name, seed=0: (root / f"{name}-{seed}") if (root / f"{name}-{seed}").exists() else \
        build(name, root / f"{name}-{seed}", seed)


@pytest.mark.parametrize("name", list(STACKS))
def test_stack_statistics_equal_the_oracle_expert_by_expert(folders, name):
    folder = folders(name)
    settings = ProbeSettings(probes=4, probe_len=10, batch_size=2, draws=2, include=("lm_head",), resident="never")
    run = ProbeRun(open_checkpoint(folder), settings, progress=False)
    key, transposed = STACKS[name]
    stack = next(w for w in run.weights if w.key == key)
    assert is_stack(stack) and stack.transposed is transposed
    rec = run.collect()
    worst = stack_oracle(run, rec, folder, rtol=1e-5)
    assert any(is_stack(w) for w in run.weights) and max(worst.values()) <= 1e-5


def _train_protected(model, mask, update_ratio=None):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = protect(model, mask, update_ratio=update_ratio)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        opt.step()
    assert handle.changed() == []
    return handle, before, dict(model.named_parameters())


@pytest.mark.parametrize("name", ["gpt_oss", "llama4_text", "qwen3_vl_moe_hub"])
def test_stack_masks_merge_and_protect(folders, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    base_dir, ft_dir = folders(name), folders(name, seed=1)
    mask = tmp_path / "m.dowser.safetensors"
    probe(str(base_dir), str(mask), settings=ProbeSettings(probes=2, probe_len=6, batch_size=2, draws=2,
                                                           update_ratio=RHO), progress=False)
    sc = Sidecar(mask)
    base = open_checkpoint(base_dir)
    key, transposed = STACKS[name]
    stacks = [n for n in sc.names if sc.mask(n).dim() == 3]
    assert key in stacks and sc.metadata["tensor_info"][key]["layout"] == ("in_out" if transposed else "out_in")
    for n in sc.names:  # the stored shape; exact per matrix, per expert slice for a stack
        m = sc.mask(n)
        assert tuple(m.shape) == tuple(base.shape(n))
        for s in (m if m.dim() == 3 else [m]):
            assert int((~s).sum()) == trainable_count(s.numel(), RHO), n
    assert not [k for k, r in (sc.metadata.get("unscored") or {}).items() if k in stacks]

    # merge: protected entries are BASE's bits, the rest FT's; re-cut at another ratio, exact per expert
    ft = open_checkpoint(ft_dir)
    for ratio, out in ((RHO, tmp_path / "out"), (0.5, tmp_path / "out50")):
        merge_checkpoint(base_dir, ft_dir, mask, out, update_ratio=ratio, progress=False)
        got = open_checkpoint(out)
        for n in ft.tensor_names():
            if ratio == RHO:
                want = torch.where(sc.mask(n), base.read(n), ft.read(n)) if n in sc.names else ft.read(n)
                assert same_bits(got.read(n), want), n
        for n in stacks:
            kept = got.read(n).view(torch.int32) == base.read(n).view(torch.int32)
            differs = base.read(n).view(torch.int32) != ft.read(n).view(torch.int32)
            assert bool(differs.all())
            for e in range(kept.shape[0]):
                assert int(kept[e].sum()) == kept[e].numel() - trainable_count(kept[e].numel(), ratio), (n, e)

    # protect: bit-identical protected entries under AdamW, at the sidecar's ratio and re-cut
    auto = AutoModelForImageTextToText if name.startswith("qwen3_vl") else AutoModelForCausalLM
    for ratio in (None, 0.5):
        model = auto.from_pretrained(base_dir, dtype=torch.float32).train()
        handle, before, now = _train_protected(model, mask, ratio)
        param = next(p for p in now if p.endswith(key.split("model.", 1)[1]) or p == key)
        moved = (now[param].detach() != before[param])
        for e in range(moved.shape[0]):
            assert 0 < int(moved[e].sum()) <= trainable_count(moved[e].numel(), ratio or RHO)


def test_an_expert_no_token_reaches_is_listed_and_inspected(folders, tmp_path):
    folder = folders("llama4_text")
    mask = tmp_path / "m.dowser.safetensors"
    probe(str(folder), str(mask), settings=ProbeSettings(probes=2, probe_len=3, batch_size=2, draws=1,
                                                         update_ratio=RHO), progress=False)
    sc = Sidecar(mask)
    unreached = {k: r for k, r in (sc.metadata.get("unscored") or {}).items() if "no probe token was routed" in r}
    assert unreached, "4 experts top-1 over 6 tokens (2 of them BOS): some expert gets none (seeded)"
    out = CliRunner().invoke(main, ["inspect", str(mask)]).output
    for k in unreached:
        stack, e = k[:-1].split("[")
        assert k in out
        psi = sc.stats(stack)[0]
        n = sc.mask(stack).shape[0]
        assert not bool(psi.reshape(psi.shape[0], n, -1)[:, int(e)].any())  # no statistics: |W| cut it


def test_a_stack_is_scored_and_cut_expert_by_expert():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(3, 6, 5, generator=gen)  # (experts, in, out): transposed
    psi, a, w = torch.rand(2, 3 * 5, generator=gen), torch.rand(2, 3 * 6, generator=gen), torch.tensor([1.0, 3.0])
    psi[:, 5:10], a[:, 6:12] = 0, 0  # expert 1: no token
    score = score_matrix(W, psi, a, w, transposed=True)
    for e in (0, 2):
        assert torch.equal(score[e], score_matrix(W[e], psi[:, 5 * e:5 * e + 5], a[:, 6 * e:6 * e + 6], w, True))
    assert torch.equal(score[1], W[1].abs())
    m = cut_mask(score, 0.3)
    assert [int((~m[e]).sum()) for e in range(3)] == [trainable_count(30, 0.3)] * 3


def test_a_linear_router_with_its_own_forward_is_scored(folders, tmp_path):
    """Llama 4's router is an nn.Linear whose forward returns (scores, logits): with --include router it is
    scored from its own F.linear call: statistics equal the oracle's, exact count."""
    folder = folders("llama4_text")
    settings = ProbeSettings(probes=4, probe_len=10, batch_size=2, draws=2, include=("router",), resident="never")
    run = ProbeRun(open_checkpoint(folder), settings, progress=False)
    key = "model.layers.1.feed_forward.router.weight"
    assert [w.kind for w in run.weights if w.key == key] == ["router"]
    rec = run.collect()
    assert bool(torch.stack(rec.psi[key]).any()) and bool(torch.stack(rec.a[key]).all())
    assert stack_oracle(run, rec, folder, rtol=1e-5)[key] <= 1e-5
    mask = tmp_path / "m.dowser.safetensors"
    probe(str(folder), str(mask), settings=ProbeSettings(probes=2, probe_len=6, batch_size=2, draws=2,
                                                         update_ratio=RHO, include=("router",)), progress=False)
    m = Sidecar(mask).mask(key)
    assert int((~m).sum()) == trainable_count(m.numel(), RHO)
