"""dowser_tool.repair: hand-computed tiny examples, the papers' formulas, mergekit's implementations
(when the `bench` extra is installed) and `dowser merge --restore` itself."""

from pathlib import Path

import pytest
import torch

from dowser_tool import DowserError
from dowser_tool.repair import methods as R
from dowser_tool.score import cut_mask, score_matrix

B = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
F = torch.tensor([[3.0, -2.0], [-0.5, 0.0]])  # delta = [[2, 0], [-1, -4]]
S = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # mean 1


def rand_pair(shape=(12, 10), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    return b.to(dtype), (b + torch.randn(shape, generator=g)).to(dtype), torch.rand(shape, generator=g)


def test_interpolate_hand_example_and_exact_ends():
    assert torch.equal(R.interpolate(B, F, 0.25), torch.tensor([[1.5, -2.0], [0.25, 3.0]]))
    b, f, _ = rand_pair(dtype=torch.bfloat16)
    assert torch.equal(R.interpolate(b, f, 0.0), b) and torch.equal(R.interpolate(b, f, 1.0), f)
    assert R.interpolate(b, f, 0.5).dtype == torch.bfloat16


def test_ties_one_finetune_is_trimmed_delta():
    # delta [[2, 0], [-1, -4]], density 0.5 keeps k = 2 largest |delta|: -4 and 2
    assert torch.equal(R.ties(B, F, 0.5, 1.0), torch.tensor([[3.0, -2.0], [0.5, 0.0]]))
    assert torch.equal(R.ties(B, F, 0.5, 0.5), torch.tensor([[2.0, -2.0], [0.5, 2.0]]))
    assert torch.equal(R.ties(B, F, 1.0, 1.0), F)


def test_ties_elects_sign_and_averages_agreeing_entries():
    base = torch.zeros(1, 4)
    f1 = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    f2 = torch.tensor([[-1.0, -3.0, 4.0, -0.5]])
    # density 1: elected signs of the sums (2, -4, 6, 0 -> +): +, -, +, +
    # entry 0: only f1 (+3) agrees -> 3; entry 1: both -> -2; entry 2: both -> 3; entry 3: f1 -> 0.5
    assert torch.equal(R.ties(base, [f1, f2], 1.0), torch.tensor([[3.0, -2.0, 3.0, 0.5]]))
    # density 0.5 keeps 2 of 4 per task: f1 {3, 2}, f2 {-3, 4}; sums (3, -3, 6, 0)
    assert torch.equal(R.ties(base, [f1, f2], 0.5), torch.tensor([[3.0, -3.0, 3.0, 0.0]]))


def test_dare_drops_and_rescales_by_one_over_keep():
    b, f, _ = rand_pair((64, 64))
    out = R.dare(b, f, 0.75, 1.0, torch.Generator().manual_seed(3))
    delta, kept = f - b, out - b
    nonzero = kept != 0
    assert 0.15 < nonzero.float().mean() < 0.35  # about 1 - 0.75 kept
    assert torch.allclose(kept[nonzero], 4.0 * delta[nonzero], atol=1e-5)
    again = R.dare(b, f, 0.75, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # deterministic given the generator
    assert torch.allclose(R.dare(b, f, 0.0, 0.6), R.interpolate(b, f, 0.6), atol=1e-6)
    with pytest.raises(DowserError, match="below 1"):
        R.dare(b, f, 1.0)


def test_restore_top_is_merges_cut():
    b, f, s = rand_pair()
    for restore in (0.0, 0.1, 0.5, 1.0):
        want = torch.where(cut_mask(s, 1 - restore), b, f)
        got = R.restore_top(b, f, s, restore)
        assert torch.equal(got, want)
        assert int((got == b).logical_and(got != f).sum()) == round(restore * s.numel())


def test_score_shrink_hand_example():
    # factors 1 / (1 + 1 * S / mean S) = [[1, 1/2], [1/3, 1/2]] on delta [[2, 0], [-1, -4]]
    want = torch.tensor([[3.0, -2.0], [0.5 - 1 / 3, 2.0]])
    assert torch.allclose(R.score_shrink(B, F, S, 1.0), want)
    assert torch.equal(R.score_shrink(B, F, S, 0.0), F)
    with pytest.raises(DowserError, match=">= 0"):
        R.score_shrink(B, F, S, -1.0)


def test_rank_interpolate_hand_example_and_constant_case():
    # ranks of S (ties by flat index): 0 -> 0, 1 (idx 1) -> 1/3, 1 (idx 3) -> 2/3, 2 -> 1
    # alpha from 1 (lowest) to 0 (highest): [[1, 2/3], [0, 1/3]]
    want = torch.tensor([[3.0, -2.0], [0.5, 4.0 - 4 / 3]])
    assert torch.allclose(R.rank_interpolate(B, F, S, 1.0, 0.0), want)
    b, f, s = rand_pair()
    assert torch.allclose(R.rank_interpolate(b, f, s, 0.4, 0.4), R.interpolate(b, f, 0.4), atol=1e-6)


def test_restore_interpolate_and_restore_trim_hand_examples():
    # top 1/4 of S is entry (1, 0): restored; others interpolated at 0.5
    assert torch.equal(R.restore_interpolate(B, F, S, 0.25, 0.5), torch.tensor([[2.0, -2.0], [0.5, 2.0]]))
    # restore_trim: entry (1, 0) restored, then the k = int(0.25 * 4) = 1 largest |delta| of the rest (-4) kept
    assert torch.equal(R.restore_trim(B, F, S, 0.25, 0.25), torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    b, f, s = rand_pair()
    assert torch.equal(R.restore_trim(b, f, s, 0.0, 0.3), R.ties(b, f, 0.3))
    assert torch.allclose(R.restore_trim(b, f, s, 0.2, 1.0), R.restore_top(b, f, s, 0.2), atol=1e-6)


def test_score_trim_hand_example_and_ties_case():
    # rank |delta| * (S / mean S)^-0.5 (zero score clamped to 1e-12 of the mean, so ranked first):
    # (0,0) 2e6, (0,1) 0, (1,0) 1/sqrt(2), (1,1) 4 -> density 0.5 keeps (0,0) and (1,1)
    assert torch.equal(R.score_trim(B, F, S, 0.5, 0.5), torch.tensor([[3.0, -2.0], [0.5, 0.0]]))
    # power -1 ranks by |delta| * S: (1,1) 4, (1,0) 2 are kept
    assert torch.equal(R.score_trim(B, F, S, 0.5, -1.0), torch.tensor([[1.0, -2.0], [-0.5, 0.0]]))
    b, f, s = rand_pair()
    assert torch.equal(R.score_trim(b, f, s, 0.3, 0.0), R.ties(b, f, 0.3))


def test_importance_matches_score_matrix_and_layer_alpha():
    g = torch.Generator().manual_seed(0)
    psi, a, w = torch.rand(3, 5, generator=g), torch.rand(3, 4, generator=g), torch.tensor([1.0, 2.0, 3.0])
    W = torch.randn(5, 4, generator=g)
    assert torch.allclose(R.importance(psi, a, w) * W.abs(), score_matrix(W, psi, a, w))
    G = R.importance(psi, a, w)
    e = R.predicted_effect(W, W + 0.1, G)
    assert e == pytest.approx(float((G * 0.1).sum() / (G * W.abs()).sum()), rel=1e-5)
    assert R.predicted_effect(W, W, G) == 0.0
    alphas = R.layer_alpha({"a": 1.0, "b": 4.0, "c": 0.0}, 0.8, 1.0)  # mean effect of the moved: 2.5
    assert alphas == pytest.approx({"a": 1.0, "b": 0.8 * 2.5 / 4.0, "c": 1.0})
    assert R.layer_alpha({"a": 1.0, "b": 4.0}, 0.6, 0.0) == {"a": 0.6, "b": 0.6}


@pytest.mark.parametrize("fn,args", [
    (R.interpolate, (0.5,)), (R.ties, (0.3,)), (R.dare, (0.5,)), (R.restore_top, (S, 0.3)),
    (R.score_shrink, (S, 1.0)), (R.rank_interpolate, (S, 0.8, 0.2)), (R.restore_interpolate, (S, 0.1, 0.5)),
    (R.restore_trim, (S, 0.1, 0.3)), (R.score_trim, (S, 0.3, 0.5)),
])
def test_dtype_shape_and_bad_inputs(fn, args):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = fn(B.to(dtype), F.to(dtype), *args)
        assert out.dtype == dtype and out.shape == B.shape
    with pytest.raises(DowserError, match="shape"):
        fn(B, F[:, :1], *args)
    with pytest.raises(DowserError, match="floating-point"):
        fn(B.long(), F.long(), *args)


def test_bad_fractions():
    with pytest.raises(DowserError, match=r"TIES density must be in \[0, 1\]"):
        R.ties(B, F, 1.5)
    with pytest.raises(DowserError, match=r"restore must be in \[0, 1\]"):
        R.restore_top(B, F, S, -0.1)
    with pytest.raises(DowserError, match="statistics do not fit"):
        R.importance(torch.ones(2, 3), torch.ones(3, 4), torch.ones(2))


# ---- against mergekit (the `bench` extra): the maintained implementations -------------
def test_matches_mergekit():
    merge_tensors = pytest.importorskip("mergekit.merge_methods").merge_tensors
    b, f1, _ = rand_pair((40, 50), seed=1)
    _, f2, _ = rand_pair((40, 50), seed=2)
    got = merge_tensors([b, f1, f2], "ties", parameters={"weight": 1.0, "density": 0.4, "lambda": 0.8}, base_index=0)
    assert torch.equal(got, R.ties(b, [f1, f2], 0.4, 0.8))
    got = merge_tensors([b, f1], "ties", parameters={"weight": 1.0, "density": 0.2, "lambda": 1.0}, base_index=0)
    assert torch.equal(got, R.ties(b, f1, 0.2))
    got = merge_tensors([b, f1], "task_arithmetic", parameters={"weight": 1.0, "lambda": 0.7}, base_index=0)
    assert torch.allclose(got, R.interpolate(b, f1, 0.7), atol=1e-6)  # lerp rounds differently near FT
    got = merge_tensors([b, f1], "linear", parameters={"weight": [0.3, 0.7]}, base_index=0)
    assert torch.allclose(got, R.interpolate(b, f1, 0.7), atol=1e-6)
    # mergekit's dare_linear rescales to the delta's L1 norm by default; with rescale off and
    # lambda * 1/(1-p) it is the paper's 1/(1-p), and its mask comes from torch's global generator
    # drawn exactly as ours is from a generator with the same seed.
    torch.manual_seed(5)
    got = merge_tensors([b, f1], "dare_linear", parameters={"weight": 1.0, "density": 0.3, "lambda": 0.8 / 0.3,
                                                            "rescale": False}, base_index=0)
    assert torch.allclose(got, R.dare(b, f1, 0.7, 0.8, torch.Generator().manual_seed(5)), atol=1e-5)


# ---- the benchmark's adapter against `dowser merge --restore` --------------------------
def test_adapter_restore_top_equals_dowser_merge(tmp_path):
    from safetensors.torch import load_file

    from benchmarks.forgetting.repairs import Pair
    from dowser_tool.repair.merge import merge_checkpoint

    from .models import make_llama
    from .test_merge import make_mask

    base = make_llama(tmp_path / "base", seed=0)
    ft = make_llama(tmp_path / "ft", seed=1)
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors")
    merge_checkpoint(base, ft, mask, tmp_path / "out", restore=0.3, progress=False)
    merged = load_file(str(Path(tmp_path / "out") / "model.safetensors"))
    got = Pair(base, ft, mask).apply("restore_top", restore=0.3)
    assert got and all(torch.equal(got[n], merged[n]) for n in got)
