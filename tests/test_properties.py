"""Property-based tests (hypothesis) of the safetensors header parser and the mask bit-packing."""

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dowser_tool.errors import DowserError
from dowser_tool.io.layout import DTYPES, itemsize, parse_header, parse_header_length
from dowser_tool.sidecar.file import pack_bits, unpack_bits

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(st.integers(0, 6), min_size=0, max_size=3), st.data())
def test_pack_unpack_roundtrip_matches_numpy(shape, data):
    n = int(np.prod(shape)) if shape else 1
    bits = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(shape)
    packed = pack_bits(mask)
    assert packed.numel() == (n + 7) // 8
    assert packed.tolist() == np.packbits(np.array(bits, dtype=bool)).tolist()
    assert torch.equal(unpack_bits(packed, tuple(shape)), mask)


def header_bytes(doc) -> bytes:
    raw = json.dumps(doc).encode()
    return struct.pack("<Q", len(raw)) + raw


@st.composite
def valid_files(draw):
    """(file bytes, {name: (dtype, shape)}) for a well-formed safetensors file."""
    names = draw(st.lists(st.text("abcdefgh.", min_size=1, max_size=8), min_size=0, max_size=5, unique=True))
    doc, specs, offset = {}, {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = int(np.prod(shape)) * itemsize(dtype) if shape else itemsize(dtype)
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        specs[name] = (dtype, tuple(shape))
        offset += nbytes
    if draw(st.booleans()):
        doc["__metadata__"] = {"k": "v"}
    return header_bytes(doc) + bytes(offset), specs


@SETTINGS
@given(valid_files())
def test_parser_reads_valid_files_like_safetensors(tmp_path_factory, case):
    blob, specs = case
    n = parse_header_length(blob[:8], "f")
    header = parse_header(blob[8 : 8 + n], len(blob), "f")
    assert {k: (e.dtype, e.shape) for k, e in header.tensors.items()} == specs
    path = tmp_path_factory.mktemp("st") / "f.safetensors"
    path.write_bytes(blob)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(specs)


@SETTINGS
@given(st.binary(max_size=300))
def test_parser_never_crashes_on_garbage(blob):
    """Any bytes: a parsed header or a DowserError, never another exception."""
    try:
        n = parse_header_length(blob[:8], "f")
        parse_header(blob[8 : 8 + n], len(blob), "f")
    except DowserError:
        pass


@SETTINGS
@given(valid_files(), st.data())
def test_parser_rejects_lies(case, data):
    """Corrupting one entry's offsets, size or dtype is always caught."""
    blob, specs = case
    if not specs:
        return
    n = parse_header_length(blob[:8], "f")
    doc = json.loads(blob[8 : 8 + n])
    name = data.draw(st.sampled_from(sorted(specs)))
    lie = data.draw(st.sampled_from(["beyond", "size", "dtype", "negative"]))
    begin, end = doc[name]["data_offsets"]
    if lie == "beyond":
        doc[name]["data_offsets"] = [begin, len(blob) + 1 + end]
    elif lie == "size":
        doc[name]["data_offsets"] = [begin, end + 1]
    elif lie == "dtype":
        doc[name]["dtype"] = "Q99"
    else:
        doc[name]["data_offsets"] = [end + 1, end]
    bad = header_bytes(doc) + blob[8 + n :]
    with pytest.raises(DowserError):
        m = parse_header_length(bad[:8], "f")
        parse_header(bad[8 : 8 + m], len(bad), "f")


def test_overlapping_tensors_rejected():
    doc = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
           "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}
    blob = header_bytes(doc) + bytes(6)
    n = parse_header_length(blob[:8], "f")
    with pytest.raises(DowserError, match="overlap"):
        parse_header(blob[8 : 8 + n], len(blob), "f")
