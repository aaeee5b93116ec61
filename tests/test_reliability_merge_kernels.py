"""The fast per-tensor merge path (dowser_tool/merge_kernels.py) gives the reference path's bits.

The reference is written out in full here: `where(cut_mask(score_matrix(...)), base, ft)` on int
views, the very functions `dowser merge` used before the fast path existed.
"""

import pytest
import torch

from dowser_tool.repair import kernels as merge_kernels
from dowser_tool.repair.merge import merge_checkpoint
from dowser_tool.repair.kernels import SAMPLE, repair_recut, score_blocks_aligned
from dowser_tool.score import cut_mask, score_matrix

from .models import make_llama
from .test_merge import assert_output, expected, make_mask, state_dict

INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def reference(base, ft, psi, a, w, rho):
    mask = cut_mask(score_matrix(base, psi, a, w), rho)
    return torch.where(mask, base.view(INT[base.element_size()]), ft.view(INT[ft.element_size()])), mask


def inputs(out_dim, in_dim, updates, dtype, seed=0, ties=False, nan=False, signed=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_dim, in_dim, generator=g) * 0.02
    ft = base + 0.001 * torch.randn(out_dim, in_dim, generator=g)
    psi, a = torch.rand(updates, out_dim, generator=g), torch.rand(updates, in_dim, generator=g)
    if ties:  # few distinct scores: thousands of ties at the threshold
        base, psi, a = base.sign() * 0.01, psi.round(decimals=1), a.round(decimals=1)
    if signed:
        psi = psi - 0.5
    base = base.to(dtype)
    if nan:
        base.view(-1)[:: 997] = float("nan")
    return base, ft.to(dtype), psi, a, torch.rand(updates, generator=g) + 0.5


CASES = [
    # (out, in, U, dtype, rho, options)
    (5632, 2048, 4, torch.bfloat16, 0.9, {}),  # the benchmark's MLP shape at the default strength
    (2048, 2048, 4, torch.bfloat16, 0.7, {}),
    (1031, 777, 16, torch.float16, 0.5, {}),  # odd sizes: blocks end inside MKL's tiles
    (700, 1500, 16, torch.float32, 0.1, {}),
    (4096, 1100, 16, torch.bfloat16, 0.9, {"ties": True}),
    (900, 1000, 8, torch.bfloat16, 0.9, {"signed": True}),
    (800, 900, 4, torch.float32, 0.9, {"nan": True}),
    (100, 50, 4, torch.bfloat16, 0.9, {}),  # small: the reference path itself
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}-U{c[2]}-{str(c[3])[6:]}-{c[4]}-{','.join(c[5])}"
                                            for c in CASES])
def test_fast_path_equals_reference_bit_for_bit(case):
    out_dim, in_dim, updates, dtype, rho, options = case
    base, ft, psi, a, w = inputs(out_dim, in_dim, updates, dtype, **options)
    want, mask = reference(base, ft, psi, a, w, rho)
    got = repair_recut(base, ft.clone(), psi, a, w, rho)
    assert got is not None
    out, restored = got
    assert torch.equal(out.view(INT[out.element_size()]), want)
    assert restored == int(mask.sum())


@pytest.mark.parametrize("shape,updates", [((4096, 11008), 16), ((1031, 2999), 16), ((5632, 2048), 4),
                                           ((333, 4097), 32)])
def test_score_row_blocks_equal_score_matrix(shape, updates):
    """The fast path makes the product and |W| block by block in a reused buffer; each block must
    hold score_matrix's bits (score_matrix makes the same row blocks, into slices of its result)."""
    base, _, psi, a, w = inputs(*shape, updates, torch.bfloat16, seed=3)
    assert score_blocks_aligned(base, psi, a, w)


def test_missed_bracket_returns_none_and_merge_falls_back(tmp_path, monkeypatch):
    base, ft, psi, a, w = inputs(1024, 600, 4, torch.bfloat16)
    monkeypatch.setattr(merge_kernels, "_bracket", lambda *args: (1e30, 2e30))  # far above every score
    assert repair_recut(base, ft.clone(), psi, a, w, 0.9) is None
    # dowser merge re-reads FT and takes the reference path: same bits as without the miss
    base_dir = make_llama(tmp_path / "base", hidden=512, layers=1, dtype=torch.bfloat16)
    ft_dir = make_llama(tmp_path / "ft", seed=1, hidden=512, layers=1, dtype=torch.bfloat16)
    mask, stats = make_mask(base_dir, tmp_path / "m.dowser.safetensors")
    merge_checkpoint(base_dir, ft_dir, mask, tmp_path / "out", restore=0.3, progress=False)
    assert_output(tmp_path / "out", expected(state_dict(base_dir), state_dict(ft_dir), stats, 0.3))


@pytest.mark.parametrize("restore", [0.1, 0.5])
def test_merge_with_matrices_on_the_fast_path_is_exact(tmp_path, restore):
    base = make_llama(tmp_path / "base", hidden=512, layers=1, dtype=torch.bfloat16)
    ft = make_llama(tmp_path / "ft", seed=1, hidden=512, layers=1, dtype=torch.bfloat16, shard_size="2MB")
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors", extra=["lm_head.weight"])
    assert any(state_dict(base)[n].numel() > 4 * SAMPLE for n in stats)  # the fast path runs
    merge_checkpoint(base, ft, mask, tmp_path / "out", restore=restore, progress=False)
    assert_output(tmp_path / "out", expected(state_dict(base), state_dict(ft), stats, restore))


def test_buffer_pool_reuses_its_own_buffers_only():
    from dowser_tool.repair.kernels import BufferPool

    pool = BufferPool(keep=2)
    first = pool.empty((1000, 1000), torch.bfloat16)
    ptr = first.data_ptr()
    pool.give_back(first)
    assert pool.empty((500, 500), torch.float32).data_ptr() == ptr  # a smaller tensor fits the same memory
    foreign = torch.zeros(1000, 1000)
    pool.give_back(foreign)  # not the pool's: never handed out (it could be a memory-mapped input)
    assert pool.empty((1000, 1000), torch.float32).data_ptr() != foreign.data_ptr()
    assert torch.equal(foreign, torch.zeros(1000, 1000))


@pytest.mark.parametrize("shape,dtype", [((700, 1001), torch.bfloat16), ((3, 5), torch.float32),
                                         ((600, 900), torch.float16)])
def test_stored_masks_apply_bit_for_bit(shape, dtype):
    from dowser_tool.repair.kernels import BLOCK_ENTRIES, apply_stored
    from dowser_tool.sidecar.file import pack_bits

    base, ft, *_ = inputs(*shape, 2, dtype, nan=True)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.7
    assert shape[0] * shape[1] % 8 or shape[0] * shape[1] > BLOCK_ENTRIES  # a padded last byte, or several blocks
    out, restored = apply_stored(base, ft.clone(), pack_bits(mask))
    as_int = INT[base.element_size()]
    assert torch.equal(out.view(as_int), torch.where(mask, base.view(as_int), ft.view(as_int)))
    assert restored == int(mask.sum())
