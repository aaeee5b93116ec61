"""`dowser inspect` starts at once (issue 19, item 5): it reads the sidecar's header and counts the
set bits of the packed masks, importing neither torch nor transformers, and its summary is the one
the masks themselves give (`Sidecar(...).mask(name)`, torch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dowser_tool.probe.run import ProbeSettings, probe
from dowser_tool.sidecar.file import Sidecar, SidecarData, write_sidecar
from dowser_tool.sidecar.header import count_bits
from dowser_tool.sidecar.summary import summarize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probed(tmp_path_factory, llama_dir):
    """A sidecar as `dowser probe` writes it (tensor_info, roles, statistics) for the tiny llama."""
    out = tmp_path_factory.mktemp("inspect-light") / "tiny.dowser.safetensors"
    probe(str(llama_dir), str(out), settings=ProbeSettings(probes=4, probe_len=8, batch_size=2, draws=2),
          progress=False)
    return out


@pytest.fixture()
def odd(tmp_path):
    """Masks whose sizes are not multiples of 8 (the last byte's padding must not count), one empty
    of protection, one full, one random."""
    g = torch.Generator().manual_seed(0)
    masks = {
        "model.layers.0.mlp.up_proj.weight": torch.arange(40).reshape(8, 5) >= 4,
        "model.layers.0.self_attn.q_proj.weight": torch.rand(13, 7, generator=g) < 0.7,
        "model.layers.1.self_attn.k_proj.weight": torch.ones(3, 3, dtype=torch.bool),
        "model.layers.1.self_attn.v_proj.weight": torch.zeros(1, 9, dtype=torch.bool),
        "model.layers.1.mlp.down_proj.weight": torch.rand(257, 33, generator=g) < 0.5,
    }
    info = {"base_model": {"id": "org/tiny", "sha": "0123456789abcdef"}, "update_ratio": 0.1}
    return write_sidecar(tmp_path / "odd.dowser.safetensors", SidecarData(masks, info=info))


def _heavy_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter; the heavy modules it left imported."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nprint('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"],
        capture_output=True, text=True, env=dict(os.environ), cwd=ROOT, check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("HEAVY ")]
    assert line, out[-2000:]
    return json.loads(line[-1][len("HEAVY "):].replace("'", '"'))


@pytest.mark.parametrize("which", ["probed", "odd"])
def test_inspect_imports_neither_torch_nor_transformers(which, request):
    path = str(request.getfixturevalue(which))
    heavy = _heavy_after(
        "import sys\n"
        "from dowser_tool.cli import main\n"
        f"main(['inspect', {path!r}], standalone_mode=False)\n"
        f"main(['inspect', {path!r}, '--json'], standalone_mode=False)\n")
    assert heavy == []


def test_inspect_plot_imports_no_torch(probed, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    heavy = _heavy_after(
        "import sys\n"
        "from dowser_tool.cli import main\n"
        f"main(['inspect', {str(probed)!r}, '--plot', {str(png)!r}], standalone_mode=False)\n")
    assert heavy == []
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_of_a_hub_sidecar_imports_no_torch(hub, probed, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / probed.name).write_bytes(probed.read_bytes())
    hub.add_repo("org/masks", repo)
    heavy = _heavy_after(
        "import sys\n"
        "from dowser_tool.cli import main\n"
        "main(['inspect', 'org/masks', '--json'], standalone_mode=False)\n")
    assert heavy == []


def _old_summary(path) -> dict:
    """The summary as `summarize` computed it before it stopped using torch: from the unpacked masks."""
    sc = Sidecar(path)
    rows, total, protected = [], 0, 0
    info = sc.metadata.get("tensor_info") or {}
    for name in sc.names:
        m = sc.mask(name)
        n, p = m.numel(), int(m.sum())
        total += n
        protected += p
        t = info.get(name) or {}
        rows.append({"tensor": name, "shape": list(m.shape), "protected_fraction": p / n if n else 0.0,
                     "kind": t.get("kind"), "layer": t.get("layer")})
    meta = {k: v for k, v in sc.metadata.items() if k not in ("tensors", "tensor_info")}
    return {"path": str(sc.path), "metadata": meta, "has_stats": sc.has_stats, "tensors": rows,
            "scored_weights": total, "protected_fraction": protected / total if total else 0.0}


@pytest.mark.parametrize("which", ["probed", "odd"])
def test_summary_is_the_one_the_masks_give(which, request):
    path = request.getfixturevalue(which)
    new, old = summarize(path), _old_summary(path)
    assert new == old  # same keys and values; fractions compared exactly (==, not approx)
    for a, b in zip(new["tensors"], old["tensors"]):
        assert a["protected_fraction"] == b["protected_fraction"]
    sc = Sidecar(path)
    for name in sc.names:
        assert sc.protected_count(name) == int(sc.mask(name).sum())


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000])
def test_count_bits_ignores_the_padding(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.5
    from dowser_tool.sidecar.file import pack_bits

    packed = pack_bits(mask).numpy().tobytes()
    padded = packed[:-1] + bytes([packed[-1] | ((1 << (-n % 8)) - 1)]) if packed else packed  # set the padding
    assert count_bits(packed, n) == count_bits(padded, n) == int(mask.sum())
