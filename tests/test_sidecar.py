import json
import math

import pytest
import torch
from safetensors.torch import save_file

from dowser_tool import DowserError, Sidecar, load_mask
from dowser_tool.io.layout import read_header
from dowser_tool.score import cut_mask, score_matrix, trainable_count
from dowser_tool.sidecar.file import SidecarData, pack_bits, unpack_bits, write_sidecar


def random_masks(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) < 0.9 for n, s in shapes.items()}


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 1000])
def test_pack_roundtrip_and_bit_order(n):
    m = torch.rand(n) < 0.5
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert torch.equal(unpack_bits(packed, (n,)), m)
    # MSB first, as numpy.packbits: entry 0 is bit 7 of byte 0
    one = torch.zeros(n, dtype=torch.bool)
    one[0] = True
    assert pack_bits(one)[0] == 128


def test_sidecar_roundtrip(tmp_path):
    shapes = {"model.layers.0.mlp.up_proj.weight": (24, 10), "model.layers.0.self_attn.q_proj.weight": (9, 7)}
    masks = random_masks(shapes)
    psi = {n: torch.rand(3, s[0]) for n, s in shapes.items()}
    a = {n: torch.rand(3, s[1]) for n, s in shapes.items()}
    w = torch.tensor([4.0, 4.0, 2.0])
    tokens = torch.randint(0, 90, (10, 6))
    info = {"base_model": {"id": "org/m", "sha": "abc"}, "method": "dowser", "update_ratio": 0.1,
            "probe": {"count": 10, "length": 6, "seed": 0, "draws": 8}}
    p = write_sidecar(tmp_path / "m.dowser.safetensors", SidecarData(masks, psi, a, w, tokens, info))
    sc = Sidecar(p)
    assert sc.shapes == shapes and sc.has_stats
    for n in shapes:
        assert torch.equal(sc.mask(n), masks[n])
        got_psi, got_a, got_w = sc.stats(n)
        assert torch.equal(got_psi, psi[n]) and torch.equal(got_a, a[n]) and torch.equal(got_w, w)
    assert torch.equal(sc.probe_tokens(), tokens)
    assert sc.metadata["base_model"] == {"id": "org/m", "sha": "abc"}
    assert sc.metadata["probe"]["draws"] == 8 and sc.metadata["format_version"] == 2
    assert torch.equal(load_mask(p)["model.layers.0.mlp.up_proj.weight"], masks["model.layers.0.mlp.up_proj.weight"])
    # written deterministically
    p2 = write_sidecar(tmp_path / "again.dowser.safetensors", SidecarData(masks, psi, a, w, tokens, info))
    assert p.read_bytes() == p2.read_bytes()


def test_mask_part_is_one_eighth_byte_per_weight(tmp_path):
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (256, 384) for i in range(4)}
    p = write_sidecar(tmp_path / "m.dowser.safetensors", SidecarData(random_masks(shapes)))
    header = read_header(p)
    weights = sum(math.prod(s) for s in shapes.values())
    mask_bytes = sum(e.nbytes for n, e in header.tensors.items() if n.startswith("mask/"))
    assert mask_bytes == weights / 8
    assert p.stat().st_size < weights / 8 + 4096  # header is small


def test_cut_mask_exact_count_and_ties():
    score = torch.tensor([[3.0, 1.0, 1.0], [1.0, 5.0, 0.5]])
    m = cut_mask(score, 0.5)  # k = 3 trainable: 0.5, then the first two of the tied 1.0s
    assert int((~m).sum()) == 3
    assert m.tolist() == [[True, False, False], [True, True, False]]
    for rho in (0.01, 0.1, 0.25, 1.0):
        s = torch.randn(37, 53).abs().round(decimals=1)  # many ties
        assert int((~cut_mask(s, rho)).sum()) == trainable_count(37 * 53, rho)


def test_score_is_weighted_mean_of_outer_products():
    W = torch.randn(5, 4)
    psi, a, w = torch.rand(3, 5), torch.rand(3, 4), torch.tensor([4.0, 4.0, 1.0])
    expect = sum(w[u] * W.abs() * psi[u][:, None] * a[u][None, :] for u in range(3)) / w.sum()
    torch.testing.assert_close(score_matrix(W, psi, a, w), expect)


def test_load_mask_recut_from_stats(tmp_path, llama_dir):
    from dowser_tool import open_checkpoint

    ckpt = open_checkpoint(llama_dir)
    names = [n for n in ckpt.tensor_names() if n.endswith("proj.weight")]
    psi = {n: torch.rand(2, ckpt.shape(n)[0]) for n in names}
    a = {n: torch.rand(2, ckpt.shape(n)[1]) for n in names}
    w = torch.tensor([4.0, 4.0])
    masks = {n: cut_mask(score_matrix(ckpt.read(n), psi[n], a[n], w), 0.1) for n in names}
    info = {"base_model": {"id": str(llama_dir)}}
    p = write_sidecar(tmp_path / "m.dowser.safetensors", SidecarData(masks, psi, a, w, None, info))
    re25 = load_mask(p, update_ratio=0.25)
    for n in names:
        numel = math.prod(ckpt.shape(n))
        assert int((~re25[n]).sum()) == trainable_count(numel, 0.25)
        assert torch.equal(re25[n], cut_mask(score_matrix(ckpt.read(n), psi[n], a[n], w), 0.25))
        assert torch.equal(load_mask(p, update_ratio=0.1, base=llama_dir)[n], masks[n])
    with pytest.raises(DowserError, match=r"must be in \(0, 1\]"):
        load_mask(p, update_ratio=1.5)


def test_foreign_and_newer_files_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(DowserError, match="not a dowser sidecar"):
        Sidecar(foreign)
    newer = tmp_path / "newer.dowser.safetensors"
    save_file({"mask/w": torch.zeros(1, dtype=torch.uint8)}, str(newer),
              metadata={"format": "dowser-mask", "format_version": "99", "tensors": json.dumps({"w": [2, 2]})})
    with pytest.raises(DowserError, match="format version 99 is newer"):
        Sidecar(newer)
    garbage = tmp_path / "garbage.dowser.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(DowserError, match="not valid JSON"):
        Sidecar(garbage)


@pytest.mark.parametrize("kind", ["continuous", "ties", "nan"])
def test_sampled_selection_is_exact_on_large_matrices(kind):
    """Large matrices take the sampled-bracket path of kth_smallest: still the exact k-th value."""
    from dowser_tool.score import kth_smallest

    g = torch.Generator().manual_seed(1)
    s = torch.rand(700, 600, generator=g)
    if kind == "ties":
        s = (s * 20).round()
    if kind == "nan":
        s[torch.rand(s.shape, generator=g) < 0.05] = float("nan")
    flat = s.reshape(-1)
    for rho in (0.001, 0.1, 0.5, 0.9, 0.999):
        k = trainable_count(flat.numel(), rho)
        if kind != "nan":
            assert kth_smallest(flat, k) == torch.kthvalue(flat, k).values
        m = cut_mask(s, rho)
        assert int((~m).sum()) == k
        if kind != "nan":  # every trainable score <= every protected score
            assert s[~m].max() <= s[m].min()
