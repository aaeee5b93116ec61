"""Quantized checkpoints are recognised for what they are (dowser_tool.model.quant): a tensor of
integers or FP8 is never taken for a weight, and where the float weight can be rebuilt exactly it is."""

import math

import pytest
import torch

from dowser_tool.errors import DowserError
from dowser_tool.model.quant import dequantize, detect, refuse


def _meta(tensors):
    st = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32",
          torch.float8_e4m3fn: "F8_E4M3"}
    return {n: (st[t.dtype], tuple(t.shape)) for n, t in tensors.items()}


def test_plain_float_checkpoint_is_not_quantized():
    t = {"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 6), "model.norm.weight": torch.ones(4)}
    assert detect({"model_type": "llama"}, _meta(t)) is None


def test_bitsandbytes_int8_dequantizes_row_by_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    scb = w.abs().amax(dim=1)
    q = torch.round(w / scb[:, None] * 127).to(torch.int8)
    t = {"m.weight": q, "m.SCB": scb, "m.weight_format": torch.tensor([0], dtype=torch.uint8),
         "norm.weight": torch.ones(6)}
    info = detect({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, _meta(t))
    assert info.scheme == "bitsandbytes 8-bit" and info.weights == ("m.weight",) and info.dequantizable
    assert set(info.companions) == {"m.SCB", "m.weight_format"}
    got = dequantize(info, "m.weight", t.__getitem__)
    assert torch.equal(got, q.float() * (scb[:, None] / 127.0))
    assert (got - w).abs().max() <= scb.max() / 127  # within one quantization step of the float weight
    # without a config: the SCB companion alone tells the scheme
    assert detect(None, _meta(t)).scheme == "bitsandbytes 8-bit"


@pytest.mark.parametrize("shape", [(8, 12), (5, 7)])  # whole blocks, and ragged edges
def test_fp8_block_scales_dequantize_block_by_block(shape):
    b = (4, 4)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    scale = torch.rand(math.ceil(shape[0] / b[0]), math.ceil(shape[1] / b[1]), generator=g) + 0.5
    full = scale.repeat_interleave(b[0], 0).repeat_interleave(b[1], 1)[: shape[0], : shape[1]]
    q = (w / full).to(torch.float8_e4m3fn)
    t = {"layer.weight": q, "layer.weight_scale_inv": scale}
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(b), "fmt": "e4m3"}}
    info = detect(cfg, _meta(t))
    assert info.scheme == "fp8 (block 4x4)" and info.dequantizable and info.companions == ("layer.weight_scale_inv",)
    got = dequantize(info, "layer.weight", t.__getitem__)
    assert got.dtype == torch.float32 and torch.equal(got, q.float() * full)


def test_fp8_with_scales_of_the_wrong_shape_is_not_dequantizable():
    t = {"layer.weight": torch.zeros(8, 8).to(torch.float8_e4m3fn), "layer.weight_scale_inv": torch.ones(3, 3)}
    info = detect({"quantization_config": {"quant_method": "fp8", "weight_block_size": [4, 4]}}, _meta(t))
    assert not info.dequantizable
    with pytest.raises(DowserError, match="cannot dequantize"):
        dequantize(info, "layer.weight", t.__getitem__)


def test_gptq_is_named_and_refused_in_one_line():
    t = {"m.qweight": torch.zeros(2, 8, dtype=torch.int32), "m.qzeros": torch.zeros(1, 1, dtype=torch.int32),
         "m.scales": torch.ones(1, 8), "m.g_idx": torch.zeros(16, dtype=torch.int32)}
    info = detect({"quantization_config": {"quant_method": "gptq", "bits": 4}}, _meta(t))
    assert info.scheme == "gptq/awq" and not info.dequantizable and info.weights == ("m.qweight",)
    msg = str(refuse(info, "FT ./ft", "merge into"))
    assert "\n" not in msg and "gptq" in msg and "dequantize" in msg and msg.startswith("FT ./ft: ")
