import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dowser_tool import DowserError, open_checkpoint
from dowser_tool.io.checkpoint import COALESCE_GAP

from .models import make_llama


def all_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(folder / f))
    return out


def test_local_single_file(llama_dir):
    ckpt = open_checkpoint(llama_dir)
    ref = all_tensors(llama_dir)
    assert sorted(ckpt.tensor_names()) == sorted(ref)
    assert ckpt.weight_files == ["model.safetensors"]
    assert ckpt.config["model_type"] == "llama"
    name = "model.layers.1.mlp.up_proj.weight"
    assert ckpt.shape(name) == tuple(ref[name].shape) and ckpt.dtype(name) == ref[name].dtype
    got = ckpt.read_many(ref)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert ckpt.sha is None and not ckpt.is_remote


def test_local_sharded(llama_sharded_dir):
    ckpt = open_checkpoint(llama_sharded_dir)
    assert len(ckpt.weight_files) > 1
    ref = all_tensors(llama_sharded_dir)
    got = ckpt.read_many(ref)
    assert sorted(got) == sorted(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    assert {ckpt.ref(n).file for n in ref} == set(ckpt.weight_files)


def test_bf16_roundtrip(tmp_path):
    d = make_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    ckpt = open_checkpoint(d)
    ref = all_tensors(d)
    for n, t in ckpt.read_many(ref).items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[n])


def test_hub_ranged_block_read_transfers_little(hub, tmp_path):
    d = make_llama(tmp_path / "m", layers=8, hidden=64, shard_size="200KB")
    sha = hub.add_repo("org/tiny", d)
    ckpt = open_checkpoint("org/tiny")
    assert ckpt.is_remote and ckpt.sha == sha
    ref = all_tensors(d)
    hub.log.clear()
    block = [n for n in ckpt.tensor_names() if n.startswith("model.layers.3.")]
    got = ckpt.read_many(block)
    assert all(torch.equal(got[n], ref[n]) for n in block)
    sent = hub.log.bytes_sent("/resolve/")
    total = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    block_bytes = sum(ref[n].numel() * ref[n].element_size() for n in block)
    assert block_bytes <= sent <= block_bytes + COALESCE_GAP * len(ckpt.weight_files)
    assert sent < total / 4, (sent, total)
    # adjacent tensors of a block come in few requests, each a Range request at the resolved sha
    assert all(r["range"] and f"/resolve/{sha}/" in r["path"] for r in hub.log.requests)
    assert len(hub.log.requests) <= len({ckpt.ref(n).file for n in block})


def test_hub_revision_resolution(hub, tmp_path):
    a = make_llama(tmp_path / "a", seed=0)
    b = make_llama(tmp_path / "b", seed=1)
    sha_a = hub.add_repo("org/m", a, tags=["v1"])
    sha_b = hub.add_repo("org/m", b)  # main moves on
    name = "model.layers.0.self_attn.q_proj.weight"
    assert open_checkpoint("org/m").sha == sha_b
    old = open_checkpoint("org/m", "v1")
    assert old.sha == sha_a and old.revision == "v1"
    assert torch.equal(old.read(name), load_file(a / "model.safetensors")[name])
    assert open_checkpoint("org/m", sha_a).sha == sha_a
    with pytest.raises(DowserError, match="revision 'nope' does not exist"):
        open_checkpoint("org/m", "nope")
    with pytest.raises(DowserError, match="no such repo"):
        open_checkpoint("org/absent")


def test_hub_download_fallback_and_offline_cache(hub, tmp_path, monkeypatch):
    d = make_llama(tmp_path / "m")
    sha = hub.add_repo("org/m", d)
    ckpt = open_checkpoint("org/m", download=True)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ckpt.read(name), load_file(d / "model.safetensors")[name])
    assert str(tmp_path / "hf-cache") in str(ckpt.file_path("model.safetensors"))
    # the config is needed by every command: fetch it into the cache too, then go offline
    ckpt.file_path("config.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.log.clear()
    off = open_checkpoint("org/m")
    assert off.sha == sha and not hub.log.requests
    assert torch.equal(off.read(name), load_file(d / "model.safetensors")[name])


def test_hub_sends_token_to_endpoint_only(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_test_token")
    hub.add_repo("org/m", make_llama(tmp_path / "m"))
    ckpt = open_checkpoint("org/m")
    ckpt.read("model.norm.weight")
    assert hub.log.requests and all(r["auth"] == "Bearer hf_secret_test_token" for r in hub.log.requests)


def test_pickle_refused_unless_allowed(tmp_path, llama_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(llama_dir / "config.json", d)
    sd = load_file(llama_dir / "model.safetensors")
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(DowserError, match="PyTorch pickles.*--allow-pickle"):
        open_checkpoint(d)
    ckpt = open_checkpoint(d, allow_pickle=True)
    assert all(torch.equal(ckpt.read(n), sd[n]) for n in sd)


def test_missing_and_bad_inputs(tmp_path, llama_dir):
    with pytest.raises(DowserError, match="no such folder"):
        open_checkpoint(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DowserError, match="no model weights found"):
        open_checkpoint(empty)
    # an index that names a missing shard
    d = tmp_path / "broken"
    shutil.copytree(llama_dir, d)
    (d / "model.safetensors").unlink()  # else transformers (and we) read the single file first
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1-of-2.safetensors"}}))
    with pytest.raises(DowserError, match="missing"):
        open_checkpoint(d)


def test_truncated_shard(tmp_path, llama_dir):
    d = tmp_path / "trunc"
    shutil.copytree(llama_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DowserError, match=r"model.safetensors: truncated"):
        open_checkpoint(d)


def test_token_not_sent_to_another_host_on_redirect(hub, tmp_path, monkeypatch):
    """The Hub redirects file downloads to a CDN; the token must stay with the configured endpoint."""
    from .hub_server import HubServer

    cdn = HubServer()
    try:
        d = make_llama(tmp_path / "m")
        sha = hub.add_repo("org/m", d)
        cdn.add_repo("org/m", d, sha=sha)
        cdn_url = cdn.url.replace("127.0.0.1", "localhost")  # another origin
        hub.redirect_files_to = cdn_url
        monkeypatch.setenv("HF_TOKEN", "hf_secret_test_token")
        ckpt = open_checkpoint("org/m")
        ref = load_file(d / "model.safetensors")
        assert torch.equal(ckpt.read("model.norm.weight"), ref["model.norm.weight"])
        assert cdn.log.requests, "the redirect was not followed"
        assert all(r["auth"] is None for r in cdn.log.requests)
        assert all(r["auth"] == "Bearer hf_secret_test_token" for r in hub.log.requests)
    finally:
        cdn.close()
