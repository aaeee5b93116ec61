"""Sidecars from the Hub (issue 15): REPO_ID and REPO_ID/FILE references, revisions, the HF cache and
HF_HUB_OFFLINE, in every entry point (merge, mask, inspect, load_mask, protect, DowserCallback), and the
`dowser probe --card` model card. Served by the Hub stand-in (tests/hub_server.py)."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dowser_tool import DowserError, Sidecar, load_mask, protect
from dowser_tool.cli import main
from dowser_tool.probe.run import ProbeSettings, probe
from dowser_tool.sidecar.file import recut_sidecar, resolve_sidecar

from .models import make_llama

SETTINGS = dict(probes=4, probe_len=8, batch_size=2, draws=2)
NAME = "tiny.dowser.safetensors"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base, a fine-tune of the same shapes, and a probed sidecar in a folder of its own (what gets uploaded)."""
    root = tmp_path_factory.mktemp("hub-sidecar")
    base, ft = make_llama(root / "base", seed=0), make_llama(root / "ft", seed=1)
    repo = root / "repo"
    repo.mkdir()
    probe(str(base), str(repo / NAME), settings=ProbeSettings(**SETTINGS), progress=False)
    return base, ft, repo / NAME


@pytest.fixture()
def served(hub, models):
    """The sidecar's folder served as org/masks; returns (base, ft, local sidecar, commit)."""
    base, ft, sidecar = models
    sha = hub.add_repo("org/masks", sidecar.parent)
    return base, ft, sidecar, sha


def test_references_resolve_into_the_cache(served, hub, tmp_path):
    base, ft, sidecar, sha = served
    for ref in ("org/masks", f"org/masks/{NAME}"):
        path = resolve_sidecar(ref)
        assert path.read_bytes() == sidecar.read_bytes()
        assert str(tmp_path / "hf-cache" / "hub") in str(path) and f"snapshots/{sha}/" in str(path)
    # files were requested at the resolved commit, and only the sidecar was downloaded
    gets = [r["path"] for r in hub.log.requests if "/resolve/" in r["path"]]
    assert gets and all(f"/resolve/{sha}/{NAME}" == g[-len(f"/resolve/{sha}/{NAME}"):] for g in gets)


def test_revisions_pick_their_commit(hub, models, tmp_path):
    base, ft, sidecar = models
    v1 = tmp_path / "v1"
    v1.mkdir()
    shutil.copy(sidecar, v1 / NAME)
    v2 = tmp_path / "v2"
    v2.mkdir()
    recut_sidecar(sidecar, 0.3, v2 / NAME)
    sha1 = hub.add_repo("org/masks", v1, tags=["v1"])
    hub.add_repo("org/masks", v2)  # main moves on
    assert resolve_sidecar("org/masks").read_bytes() == (v2 / NAME).read_bytes()
    assert resolve_sidecar("org/masks", "v1").read_bytes() == sidecar.read_bytes()
    assert resolve_sidecar(f"org/masks/{NAME}", sha1).read_bytes() == sidecar.read_bytes()
    assert Sidecar("org/masks").metadata["update_ratio"] == 0.3
    assert Sidecar("org/masks", revision="v1").metadata["update_ratio"] == 0.1


def test_bad_references_are_one_line_errors(hub, models, tmp_path):
    base, ft, sidecar = models
    empty, two = tmp_path / "empty", tmp_path / "two"
    empty.mkdir()
    (empty / "README.md").write_text("no sidecar here")
    two.mkdir()
    shutil.copy(sidecar, two / "a.dowser.safetensors")
    shutil.copy(sidecar, two / "b.dowser.safetensors")
    hub.add_repo("org/empty", empty)
    hub.add_repo("org/two", two)
    hub.add_repo("org/masks", sidecar.parent)
    cases = [
        ("org/empty", None, "holds no *.dowser.safetensors file (README.md)"),
        ("org/two", None, "holds 2 sidecars (a.dowser.safetensors, b.dowser.safetensors); name one, "
                          "e.g. org/two/a.dowser.safetensors"),
        ("org/masks/other.dowser.safetensors", None, f"has no file 'other.dowser.safetensors' (its sidecars: {NAME})"),
        ("org/absent", None, "no such local file, and no repo org/absent on"),
        ("org/masks", "nope", "revision 'nope' of org/masks does not exist"),
        ("missing.dowser.safetensors", None, "missing.dowser.safetensors: no such file"),
        ("runs/missing.dowser.safetensors", None, "runs/missing.dowser.safetensors: no such file"),
        (str(tmp_path / "absent.dowser.safetensors"), None, "no such file"),
    ]
    for ref, revision, message in cases:
        with pytest.raises(DowserError, match=None) as e:
            resolve_sidecar(ref, revision)
        assert message in str(e.value) and "\n" not in str(e.value), (ref, str(e.value))
    # local folders: the single sidecar, or the same errors
    with pytest.raises(DowserError, match=f"holds 2 sidecars .*; name one, e.g. {two}/a.dowser.safetensors"):
        resolve_sidecar(two)
    with pytest.raises(DowserError, match="no such file: it is a folder, and holds no"):
        resolve_sidecar(empty)
    # the sidecar picked out of a repo with two, by name
    assert resolve_sidecar("org/two/b.dowser.safetensors").read_bytes() == sidecar.read_bytes()
    # a local path takes no revision
    with pytest.raises(DowserError, match="a revision applies to Hub sidecars, not to local files"):
        resolve_sidecar(sidecar, "v1")
    r = run("inspect", "org/two")
    assert r.exit_code == 1 and r.output.startswith("error: org/two@") and r.output.count("\n") == 1


def test_an_existing_local_path_wins(served, hub, tmp_path, monkeypatch):
    base, ft, sidecar, sha = served
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "org" / "masks"
    local.mkdir(parents=True)
    recut_sidecar(sidecar, 0.5, local / "local.dowser.safetensors")
    hub.log.clear()
    assert resolve_sidecar("org/masks").absolute() == local / "local.dowser.safetensors"  # a folder, one sidecar
    assert Sidecar("org/masks").metadata["update_ratio"] == 0.5
    assert not hub.log.requests  # the Hub was never asked


def _merge_outputs(folder):
    return load_file(folder / "model.safetensors")


def _trained(model, handle):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return handle.changed()


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline-after-download"])
def test_every_entry_point_takes_a_hub_sidecar(served, hub, tmp_path, monkeypatch, offline):
    """merge, mask, inspect, load_mask, protect and DowserCallback give what the local file gives, online and
    (after one download) with HF_HUB_OFFLINE=1 and no request at all."""
    from transformers import AutoModelForCausalLM

    from dowser_tool.train.callback import DowserCallback

    base, ft, sidecar, sha = served
    if offline:
        resolve_sidecar("org/masks")  # the first download
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.log.clear()
    # merge: bit-exact to the merge with the local file, at a re-cut strength and at the sidecar's own
    for restore in ("0.3", "0.9"):
        local_out, hub_out = tmp_path / f"local-{restore}", tmp_path / f"hub-{restore}"
        assert run("merge", "--base", base, "--finetuned", ft, "--mask", sidecar, "--restore", restore,
                   "--out", local_out, "-q").exit_code == 0
        r = run("merge", "--base", base, "--finetuned", ft, "--mask", "org/masks", "--restore", restore,
                "--out", hub_out, "-q")
        assert r.exit_code == 0, r.output
        want, got = _merge_outputs(local_out), _merge_outputs(hub_out)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        repair = json.loads((hub_out / "dowser_repair.json").read_text())
        assert repair["mask"]["sha256"] == json.loads((local_out / "dowser_repair.json").read_text())["mask"]["sha256"]
    # mask: the re-cut file is byte-identical to the local re-cut
    recut_sidecar(sidecar, 0.25, tmp_path / "local-0.25.dowser.safetensors", base=base)
    r = run("mask", f"org/masks/{NAME}", "--update-ratio", "0.25", "--base", base, "--out", tmp_path / "hub-0.25.dowser.safetensors")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hub-0.25.dowser.safetensors").read_bytes() == (tmp_path / "local-0.25.dowser.safetensors").read_bytes()
    # inspect: the same summary but for the path
    local_json, hub_json = (json.loads(run("inspect", ref, "--json").output) for ref in (sidecar, "org/masks"))
    assert local_json.pop("path") != hub_json.pop("path") and local_json == hub_json
    # load_mask, stored and re-cut
    for ratio in (None, 0.2):
        want, got = load_mask(sidecar, ratio, base=base), load_mask("org/masks", ratio, base=base)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # protect and DowserCallback: same coverage, protected entries unchanged through training
    model = AutoModelForCausalLM.from_pretrained(base).train()
    handle = protect(model, "org/masks", update_ratio=0.2)
    local_model = AutoModelForCausalLM.from_pretrained(base).train()
    local_handle = protect(local_model, sidecar, update_ratio=0.2)
    assert (handle.names, handle.trainable, handle.protected) == (local_handle.names, local_handle.trainable,
                                                                   local_handle.protected)
    assert _trained(model, handle) == []
    handle.remove()
    local_handle.remove()
    callback = DowserCallback("org/masks")
    assert callback.mask_path.read_bytes() == sidecar.read_bytes()
    model = AutoModelForCausalLM.from_pretrained(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    callback.on_train_begin(None, None, None, model=model, optimizer=opt)
    assert callback.handle.trainable == sum(int((~m).sum()) for m in load_mask(sidecar).values())
    callback.on_train_end(None, None, None)
    if offline:
        assert not hub.log.requests, hub.log.requests
    else:
        assert any(f"/resolve/{sha}/" in r["path"] for r in hub.log.requests)


def test_offline_without_a_download_is_a_clear_error(served, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DowserError, match="HF_HUB_OFFLINE is set but org/masks is not in the HF cache"):
        load_mask("org/masks")
    with pytest.raises(DowserError, match="revision= applies to a sidecar path or Hub reference"):
        protect(torch.nn.Linear(2, 2), {}, revision="v1")


def test_probe_card_is_a_hub_model_card(hub, tmp_path, models):
    """`dowser probe --card` writes README.md in the Hub's model-card format beside the sidecar; uploading
    the folder serves a page whose sidecar every command finds."""
    from huggingface_hub import ModelCard

    base, ft, sidecar = models
    sha = hub.add_repo("org/tiny", base)
    folder = tmp_path / "upload"
    folder.mkdir()
    out = folder / NAME
    r = run("probe", "org/tiny", "--out", out, "--probes", 4, "--probe-len", 8, "--batch-size", 2, "--draws", 2,
            "--card", "--card-repo", "org/tiny-dowser", "-q")
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == f"wrote {folder / 'README.md'}"
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/tiny" and card.data.library_name == "dowser-tool"
    assert {"dowser", "model-dowser", "method-dowser"} <= set(card.data.tags)
    text = card.text
    for fragment in (f"`{NAME}`", f"org/tiny @ `{sha}`", "| method | dowser |", "| estimator | reference |",
                     "| update ratio | 0.1", "| decoder layers | 0-1 (2) |", "count 4", "draws 2", "length 8",
                     f"dowser merge --base org/tiny --base-revision {sha} --finetuned ./my-finetune "
                     "--mask org/tiny-dowser --out", 'protect(model, "org/tiny-dowser")',
                     'DowserCallback("org/tiny-dowser")'):
        assert fragment in text, fragment
    assert "ORG/NAME" not in text
    # an existing README is never overwritten without --force, and nothing else is written either
    again = folder / "again.dowser.safetensors"
    r = run("probe", "org/tiny", "--out", again, "--card", "-q")
    assert r.exit_code == 1 and r.output == f"error: {folder / 'README.md'}: already exists (pass --force to overwrite)\n"
    assert not again.exists()
    before = (folder / "README.md").read_text()
    r = run("probe", "org/tiny", "--out", out, "--probes", 4, "--probe-len", 8, "--batch-size", 2, "--draws", 2,
            "--card", "--force", "-q")
    assert r.exit_code == 0, r.output
    after = ModelCard.load(folder / "README.md")
    assert after.text != before and "`ORG/NAME` stands for the id of the repository" in after.text
    # the uploaded folder: README beside one sidecar; the sidecar is found and works
    hub.add_repo("org/tiny-dowser", folder)
    assert resolve_sidecar("org/tiny-dowser").read_bytes() == out.read_bytes()
    assert run("inspect", "org/tiny-dowser").exit_code == 0
    r = run("probe", "org/tiny", "--card-repo", "org/x", "--out", tmp_path / "x.dowser.safetensors")
    assert r.exit_code == 1 and "--card-repo names the repo in the model card: pass --card too" in r.output


def test_card_of_a_local_base_names_the_folder(models, tmp_path):
    from huggingface_hub import ModelCard

    from dowser_tool.interop.card import write_model_card

    base, ft, sidecar = models
    folder = tmp_path / "local"
    folder.mkdir()
    shutil.copy(sidecar, folder / NAME)
    path = write_model_card(folder / NAME)
    card = ModelCard.load(path)
    assert card.data.base_model is None and card.data.library_name == "dowser-tool"
    assert f"| base model | {base} |" in card.text and f"dowser merge --base {base} --finetuned" in card.text
    with pytest.raises(DowserError, match="already exists"):
        write_model_card(folder / NAME)
