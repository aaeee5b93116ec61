"""Quantized checkpoints: which scheme a checkpoint uses and which of its tensors are not weights.

A quantized tensor only means something together with its scales: an int8 `weight` of
bitsandbytes is `weight * SCB / 127` row by row, an FP8 `weight` of a block-quantized
checkpoint is `weight * weight_scale_inv` block by block, GPTQ/AWQ pack 4-bit integers into
`qweight` beside `qzeros` and `scales`. Restoring BASE's float entries into such a tensor, or
scoring its integers as if they were weights, gives a silently wrong result, so every stage asks
`detect` first. Where the float weight can be rebuilt exactly from what is stored (FP8 with block
scales, bitsandbytes 8-bit), `dequantize` does it; for the other schemes callers refuse.

Sources: transformers' quantizers (`integrations/finegrained_fp8.py`: `weight_scale_inv` of shape
(ceil(out/b0), ceil(in/b1)); `integrations/bitsandbytes.py` and bitsandbytes' `Int8Params`: `SCB`
absmax per output row; GPTQ/AWQ `qweight`/`qzeros`/`scales`/`g_idx`; compressed-tensors
`weight_packed`/`weight_scale`/`weight_zero_point`), and `quantization_config.quant_method` in
config.json. Imports: errors, `io.layout` (and torch inside `dequantize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import DowserError

# Tensor-name suffixes that carry quantization state rather than a weight, by scheme.
_COMPANIONS = {
    "bitsandbytes 8-bit": (".SCB", ".weight_format"),
    "bitsandbytes 4-bit": (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map",
                           ".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4"),
    "fp8": (".weight_scale_inv", ".input_scale", ".weight_scale"),
    "gptq/awq": (".qweight", ".qzeros", ".scales", ".g_idx"),
    "compressed-tensors": (".weight_packed", ".weight_zero_point", ".weight_shape", ".weight_global_scale"),
}
_FLOAT = {"F64", "F32", "F16", "BF16"}
_METHOD_NAMES = {"bitsandbytes": "bitsandbytes", "fp8": "fp8", "fbgemm_fp8": "fp8", "gptq": "gptq/awq",
                 "awq": "gptq/awq", "compressed-tensors": "compressed-tensors"}


@dataclass(frozen=True)
class Quantization:
    """What `detect` found in one checkpoint.

    scheme: a readable name ("fp8 (block 128x128)", "bitsandbytes 8-bit", "gptq/awq", ...);
    method: `quantization_config.quant_method` when the config names one; weights: names of the
    stored non-float weights (or packed weights) that stand for float matrices; companions: names
    of the scale / zero-point / format tensors; dequantizable: whether `dequantize` rebuilds every
    weight exactly from what is stored.
    """

    scheme: str
    method: str | None
    weights: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()
    dequantizable: bool = False
    block: tuple[int, int] | None = field(default=None)

    def describe(self) -> str:
        """One phrase for an error message: the scheme and how many tensors it covers."""
        what = f"{len(self.weights)} quantized weight{'s' if len(self.weights) != 1 else ''}" if self.weights else "no stored weight"
        via = f"quantization_config.quant_method {self.method!r}, " if self.method else ""
        return f"quantized with {self.scheme} ({via}{what}, {len(self.companions)} scale/format tensors)"


def _scheme_of(name: str) -> str | None:
    for scheme, suffixes in _COMPANIONS.items():
        if name.endswith(suffixes):
            return scheme
    return None


def detect(config: dict | None, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Quantization | None:
    """The quantization of a checkpoint, or None when every weight is a plain float tensor.

    `config`: its config.json (dict, may be None); `tensors`: {name: (safetensors dtype string,
    shape)} of every stored tensor. Signs, any one of which is enough: a `quantization_config`,
    a tensor whose name is a known companion (scales, zero points, bitsandbytes state), or a 2-D
    `*.weight` stored as an integer or FP8 type. Returns a `Quantization` naming the scheme.
    """
    qc = (config or {}).get("quantization_config") or {}
    if not isinstance(qc, dict):
        qc = {}
    method = qc.get("quant_method")
    companions = sorted(n for n in tensors if _scheme_of(n))
    weights = sorted(n for n, (dtype, shape) in tensors.items()
                     if (n.endswith(".weight") and dtype not in _FLOAT and len(shape) >= 2)
                     or n.endswith((".qweight", ".weight_packed")))
    if not (qc or companions or weights):
        return None
    scheme = _METHOD_NAMES.get(str(method), None) if method else None
    if scheme is None:
        found = {_scheme_of(n) for n in companions} - {None}
        scheme = found.pop() if len(found) == 1 else ("mixed: " + ", ".join(sorted(found)) if found else "unknown")
    block = None
    if scheme == "bitsandbytes":
        scheme = "bitsandbytes 4-bit" if qc.get("load_in_4bit") or any(".weight.absmax" in n for n in companions) \
            else "bitsandbytes 8-bit"
    if scheme == "fp8":
        b = qc.get("weight_block_size")
        block = (int(b[0]), int(b[1])) if isinstance(b, (list, tuple)) and len(b) == 2 else None
        scheme = f"fp8 (block {block[0]}x{block[1]})" if block else "fp8"
    return Quantization(scheme, method, tuple(weights), tuple(companions), _dequantizable(scheme, weights, tensors, block),
                        block)


def detect_checkpoint(ckpt) -> Quantization | None:
    """`detect` on an opened `io.checkpoint.Checkpoint`: its config.json and every tensor's dtype
    and shape, read from the headers (no tensor data)."""
    from ..io.layout import TORCH_TO_ST

    tensors = {n: (TORCH_TO_ST.get(ckpt.dtype(n), str(ckpt.dtype(n))), tuple(ckpt.shape(n))) for n in ckpt.tensor_names()}
    return detect(ckpt.config, tensors)


def _dequantizable(scheme: str, weights, tensors, block) -> bool:
    if scheme == "bitsandbytes 8-bit":
        return all(n[: -len("weight")] + "SCB" in tensors for n in weights)
    if scheme.startswith("fp8") and block is not None:
        for n in weights:
            scale = tensors.get(n + "_scale_inv")
            if scale is None or tensors[n][0] not in ("F8_E4M3", "F8_E5M2"):
                return False
            out, inp = tensors[n][1][-2:]
            if tuple(scale[1][-2:]) != (math.ceil(out / block[0]), math.ceil(inp / block[1])):
                return False
        return True
    return False


def dequantize(q: Quantization, name: str, read):
    """The float32 weight that quantized weight `name` stands for, rebuilt exactly.

    `read(name) -> torch.Tensor` reads a stored tensor. FP8 with block scales:
    W = float(weight) * weight_scale_inv[i // b0, j // b1]; bitsandbytes 8-bit:
    W = float(weight) * SCB[i] / 127. Raises DowserError for a scheme that cannot be rebuilt.
    """
    import torch

    if not q.dequantizable or name not in q.weights:
        raise DowserError(f"{name}: cannot dequantize a weight {q.describe()}")
    w = read(name).to(torch.float32)
    if q.scheme == "bitsandbytes 8-bit":
        scb = read(name[: -len("weight")] + "SCB").to(torch.float32)
        return w * (scb.reshape(-1, *([1] * (w.dim() - 1))) / 127.0)
    b0, b1 = q.block
    scale = read(name + "_scale_inv").to(torch.float32)
    full = scale.repeat_interleave(b0, dim=-2).repeat_interleave(b1, dim=-1)
    return w * full[..., : w.shape[-2], : w.shape[-1]]


def refuse(q: Quantization, where: str, action: str) -> DowserError:
    """The one-line refusal for `action` ("merge into", "probe", ...) on a quantized checkpoint."""
    remedy = ("load it with from_pretrained, call model.dequantize() (or load with the quantization disabled) and "
              "save_pretrained a float copy, then use that")
    return DowserError(f"{where}: is {q.describe()}; dowser cannot {action} quantized tensors as weights: {remedy}")
