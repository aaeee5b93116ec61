"""Interchange with the released Model-Dowser scripts' per-module score files (issue 15):
`dowser import-scores` / `dowser export-scores`, the full-score sidecar format, and refusals."""

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dowser_tool import DowserError, Sidecar, load_mask, open_checkpoint, protect
from dowser_tool.cli import main
from dowser_tool.interop.released import export_scores, import_scores
from dowser_tool.probe.run import ProbeSettings, probe
from dowser_tool.score import cut_mask, score_matrix, trainable_count
from dowser_tool.sidecar.file import OUTPUT_HEAD, SidecarData, write_sidecar

from .families import build
from .models import EXAMPLE_LLAVA, make_llama

SETTINGS = dict(probes=4, probe_len=8, batch_size=2, draws=2)
RELEASED_KEYS = {"name", "importance_matrix_mean", "importance_matrix_std", "W_shape", "W_fro", "num_samples"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(r, *fragments):
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])


def same_masks(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """The example LLaVA probed with image probes on every part the released format names."""
    root = tmp_path_factory.mktemp("interchange-llava")
    base = shutil.copytree(EXAMPLE_LLAVA, root / "tiny-llava")
    sidecar = root / "tiny-llava.dowser.safetensors"
    probe(str(base), str(sidecar), settings=ProbeSettings(images=True, include=("lm_head", "projector", "vision"),
                                                          **SETTINGS), progress=False)
    return base, sidecar


def _welford_std(W, psi, a, w):
    """The scripts' RunningStats: weighted population std over updates of psi_u |W| a_u^T, accumulated one
    update at a time (Welford), in float64 here."""
    mean = m2 = None
    count = 0.0
    for u in range(psi.shape[0]):
        x = (psi[u, :, None].double() * W.abs().double() * a[u, None, :].double())
        wu = float(w[u])
        if mean is None:
            mean, m2, count = x.clone(), torch.zeros_like(x), wu
            continue
        total = count + wu
        delta = x - mean
        mean += delta * (wu / total)
        m2 += (x - mean) * delta * wu
        count = total
    return (m2 / count).clamp(min=0).sqrt()


def test_export_then_import_gives_identical_masks(llava, tmp_path):
    base, sidecar = llava
    sc = Sidecar(sidecar)
    exported = tmp_path / "scores"
    r = run("export-scores", sidecar, "--out", exported)
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in exported.iterdir())
    assert len(files) == len(sc.names) and "lm_head.pt" in files and "proj_0.pt" in files and "proj_1.pt" in files
    assert {f"llm_{i}_{m}.pt" for i in range(4) for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                                                          "self_attn_o_proj", "mlp_gate_proj", "mlp_up_proj",
                                                          "mlp_down_proj")} <= set(files)
    assert any(f.startswith("vision_encoder_layers_0_") for f in files)
    objs = {}
    for f in files:
        obj = torch.load(exported / f, weights_only=True)
        assert set(obj) == RELEASED_KEYS and f == obj["name"].replace(".", "_") + ".pt"
        objs[obj["name"]] = obj
    # import: the same masks at the sidecar's ratio, and the same re-cuts at any other
    imported = tmp_path / "imported.dowser.safetensors"
    r = run("import-scores", exported, "--base", base, "--out", imported)
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {imported}: {len(sc.names)} tensors")
    got = Sidecar(imported)
    assert same_masks(got.masks(), sc.masks())
    # each file is what the scripts write, for the tensor it is read back onto: the score, the std of the
    # per-update products (the scripts' Welford, recomputed here), the weight's shape and norm, K x M samples
    ckpt = open_checkpoint(base)
    for name, info in got.metadata["tensor_info"].items():
        obj, W = objs[info["released_name"]], ckpt.read(name)
        psi, a, w = sc.stats(name)
        assert torch.equal(obj["importance_matrix_mean"], score_matrix(W, psi, a, w))
        torch.testing.assert_close(obj["importance_matrix_std"].double(), _welford_std(W, psi, a, w),
                                   rtol=1e-4, atol=1e-9)
        assert obj["W_shape"] == W.shape and type(obj["W_shape"]) is torch.Size
        assert obj["W_fro"] == pytest.approx(float(W.double().norm()), rel=1e-6)
        assert obj["num_samples"] == 4 * 2  # K probes x M draws, as the scripts count
    assert got.roles == sc.roles == {"language_model.lm_head.weight": OUTPUT_HEAD}
    for ratio in (0.05, 0.3):
        assert same_masks(load_mask(imported, ratio), load_mask(sidecar, ratio))
    assert got.has_scores and got.has_stats and not got.has_factors
    assert got.metadata["has_stats"] is False and got.metadata["format_version"] == 2
    assert got.metadata["imported"]["files"] == len(sc.names) and got.metadata["imported"]["num_samples"] == [8]
    assert got.metadata["layers"] == [0, 1, 2, 3] and got.metadata["include"] == ["lm_head", "projector", "vision"]
    info = sc.metadata["tensor_info"]
    assert {n: i["part"] for n, i in got.metadata["tensor_info"].items()} == {n: i["part"] for n, i in info.items()}
    # re-cutting paths: dowser mask, merge --restore (bit-exact to the original sidecar's), protect
    r = run("mask", imported, "--update-ratio", "0.3", "--out", tmp_path / "r03.dowser.safetensors")
    assert r.exit_code == 0, r.output
    assert same_masks(Sidecar(tmp_path / "r03.dowser.safetensors").masks(), load_mask(sidecar, 0.3))
    ft = tmp_path / "ft"
    shutil.copytree(base, ft)
    tensors = load_file(ft / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    tensors = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in tensors.items()}
    from safetensors.torch import save_file

    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    for restore in ("0.1", "0.9"):
        outs = []
        for mask in (sidecar, imported):
            out = tmp_path / f"merged-{restore}-{mask.stem}"
            r = run("merge", "--base", base, "--finetuned", ft, "--mask", mask, "--restore", restore, "--out", out, "-q")
            assert r.exit_code == 0, r.output
            outs.append(load_file(out / "model.safetensors"))
        assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    from transformers import AutoModelForImageTextToText

    handles = [protect(AutoModelForImageTextToText.from_pretrained(base), m, update_ratio=0.3) for m in (sidecar, imported)]
    assert (handles[0].names, handles[0].trainable) == (handles[1].names, handles[1].trainable)


def test_import_of_files_laid_out_as_the_released_scripts_write_them(tmp_path):
    """Files made as the scripts make them, from the model in memory with their module names (LLaVA-1.5's
    `proj.0`/`proj.2` projector and `vision.vision_model.*` tower names included), bf16 scores: each lands on the
    checkpoint tensor holding that module's weight, cut at exactly round(rho * numel) trainable entries."""
    from transformers import AutoModelForImageTextToText

    base = shutil.copytree(EXAMPLE_LLAVA, tmp_path / "tiny-llava")
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    modules = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            modules[f"llm.{i}.{sub}"] = layer.get_submodule(sub)
    modules["lm_head"] = model.lm_head
    modules["proj.0"] = model.model.multi_modal_projector.linear_1
    modules["proj.2"] = model.model.multi_modal_projector.linear_2
    modules["vision.vision_model.encoder.layers.1.mlp.fc2"] = model.model.vision_tower.encoder.layers[1].mlp.fc2
    folder = tmp_path / "importance_mats_mc_selfgen"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    means = {}
    for name, m in modules.items():
        W = m.weight.detach()
        # bf16 scores with many ties, as the scripts save them
        mean = (torch.rand(W.shape, generator=gen) * 4).round(decimals=1).to(torch.bfloat16)
        means[name] = (mean, W)
        torch.save({"name": name, "importance_matrix_mean": mean, "importance_matrix_std": mean / 2,
                    "W_shape": W.shape, "W_fro": W.pow(2).sum().sqrt().float().item(), "num_samples": 512},
                   folder / f"{name.replace('.', '_')}.pt")
    out = tmp_path / "imported.dowser.safetensors"
    r = run("import-scores", folder, "--base", base, "--out", out, "--update-ratio", "0.1")
    assert r.exit_code == 0, r.output
    sc = Sidecar(out)
    stored = load_file(base / "model.safetensors")
    by_released = {i["released_name"]: n for n, i in sc.metadata["tensor_info"].items()}
    assert set(by_released) == set(modules)
    for name, (mean, W) in means.items():
        key = by_released[name]
        assert torch.equal(stored[key], W), (name, key)  # the tensor that holds this module's weight
        mask = sc.mask(key)
        assert torch.equal(mask, cut_mask(mean.float(), 0.1))
        assert int((~mask).sum()) == trainable_count(mean.numel(), 0.1)
        score = load_file(out)[f"score/{key}"]
        assert score.dtype == torch.bfloat16 and torch.equal(score, mean)
        assert torch.equal(sc.recut(key, None, 0.4), cut_mask(mean.float(), 0.4))
    assert by_released["proj.0"] == "multi_modal_projector.linear_1.weight"
    assert by_released["vision.vision_model.encoder.layers.1.mlp.fc2"] == "vision_tower.encoder.layers.1.mlp.fc2.weight"
    assert sc.roles == {by_released["lm_head"]: OUTPUT_HEAD}
    assert sc.metadata["imported"]["score_dtype"] == ["bfloat16"] and sc.metadata["imported"]["num_samples"] == [512]
    # `dowser inspect` reads it; re-cut needs no base; its Hub card says where it came from
    r = run("inspect", out)
    assert r.exit_code == 0 and "saved (re-cut at any ratio)" in r.output
    from huggingface_hub import ModelCard

    from dowser_tool.interop.card import write_model_card

    card = ModelCard.load(write_model_card(out, repo_id="org/llava-dowser"))
    assert card.data.base_model is None and "| imported from | Model-Dowser released scripts" in card.text
    assert "| scores | full score matrices: masks can be re-cut at any ratio |" in card.text


def test_nvila_llm_prefix_and_tied_head(tmp_path):
    """NVILA's LLM keys carry `llm.` (the anatomy maps them); a tied head's file lands on the embedding with
    the output-head role; export names it lm_head again."""
    from transformers import AutoModelForCausalLM

    nvila = build("nvila_folder", tmp_path / "nvila")
    llm = AutoModelForCausalLM.from_pretrained(nvila / "llm")
    folder = tmp_path / "nvila-scores"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i, layer in enumerate(llm.model.layers):
        for sub in ("self_attn.q_proj", "mlp.down_proj"):
            W = layer.get_submodule(sub).weight.detach()
            torch.save({"name": f"llm.{i}.{sub}", "importance_matrix_mean": torch.rand(W.shape, generator=gen),
                        "W_shape": W.shape, "W_fro": float(W.norm()), "num_samples": 512},
                       folder / f"llm_{i}_{sub.replace('.', '_')}.pt")
    out = tmp_path / "nvila.dowser.safetensors"
    import_scores(folder, nvila, out)
    assert sorted(Sidecar(out).names) == sorted(f"llm.model.layers.{i}.{s}.weight" for i in range(len(llm.model.layers))
                                                for s in ("self_attn.q_proj", "mlp.down_proj"))
    torch.save({"name": "proj.layers.2", "importance_matrix_mean": torch.rand(3, 3)}, folder / "proj_layers_2.pt")
    with pytest.raises(DowserError, match="1 projector files \\(proj.layers.2\\) but BASE's projector has 0"):
        import_scores(folder, nvila, tmp_path / "x.dowser.safetensors")
    # tied head
    tied = make_llama(tmp_path / "tied", tie=True)
    model = AutoModelForCausalLM.from_pretrained(tied)
    folder = tmp_path / "tied-scores"
    folder.mkdir()
    W = model.lm_head.weight.detach()
    torch.save({"name": "lm_head", "importance_matrix_mean": torch.rand(W.shape, generator=gen), "W_shape": W.shape,
                "W_fro": float(W.norm()), "num_samples": 8}, folder / "lm_head.pt")
    out = tmp_path / "tied.dowser.safetensors"
    import_scores(folder, tied, out)
    assert Sidecar(out).roles == {"model.embed_tokens.weight": OUTPUT_HEAD}
    export_scores(out, tmp_path / "tied-export")
    again = torch.load(tmp_path / "tied-export" / "lm_head.pt", weights_only=True)
    assert again["name"] == "lm_head" and "importance_matrix_std" not in again  # imported scores have no std
    assert torch.equal(again["importance_matrix_mean"], load_file(out)["score/model.embed_tokens.weight"])
    assert again["num_samples"] == 8


def test_conv1d_weights_round_trip_in_their_stored_layout(tmp_path):
    """GPT-2's Conv1D stores (in, out): scores are exported in that layout (what the weight's shape is) and
    come back as the same masks."""
    base = build("gpt2", tmp_path / "gpt2")
    sidecar = tmp_path / "gpt2.dowser.safetensors"
    probe(str(base), str(sidecar), settings=ProbeSettings(**SETTINGS), progress=False)
    sc = Sidecar(sidecar)
    assert any(sc.transposed(n) for n in sc.names)
    export_scores(sidecar, tmp_path / "scores", dtype="float32")
    name = next(n for n in sc.names if n.endswith("attn.c_attn.weight"))
    obj = torch.load(tmp_path / "scores" / "llm_0_attn_c_attn.pt", weights_only=True)
    W = open_checkpoint(base).read(name)
    assert obj["W_shape"] == W.shape and torch.equal(obj["importance_matrix_mean"], sc.score(name, W))
    import_scores(tmp_path / "scores", base, tmp_path / "back.dowser.safetensors")
    assert same_masks(Sidecar(tmp_path / "back.dowser.safetensors").masks(), sc.masks())


class _Shell:
    """A pickle payload that would run a command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _scores_of(base, folder, names=("llm.0.self_attn.q_proj",)):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    folder.mkdir(exist_ok=True)
    for name in names:
        W = model.model.layers[int(name.split(".")[1])].get_submodule(name.split(".", 2)[2]).weight.detach()
        torch.save({"name": name, "importance_matrix_mean": torch.rand(W.shape), "W_shape": W.shape,
                    "W_fro": float(W.norm()), "num_samples": 8}, folder / f"{name.replace('.', '_')}.pt")
    return folder


def test_bad_score_files_are_refused_in_one_line(tmp_path, llama_dir):
    out = tmp_path / "out.dowser.safetensors"
    folder = _scores_of(llama_dir, tmp_path / "scores")
    good = torch.load(folder / "llm_0_self_attn_q_proj.pt", weights_only=True)
    marker = tmp_path / "pwned"

    def case(payload, file="llm_0_self_attn_q_proj.pt"):
        bad = tmp_path / f"bad-{len(list(tmp_path.glob('bad-*')))}"
        shutil.copytree(folder, bad)
        (bad / "llm_0_self_attn_q_proj.pt").unlink()
        torch.save(payload, bad / file)
        return run("import-scores", bad, "--base", llama_dir, "--out", out)

    # a pickle that is not plain data: refused by the weights-only unpickler, nothing runs
    r = case({**good, "importance_matrix_mean": _Shell(marker)})
    assert_one_line_error(r, "llm_0_self_attn_q_proj.pt: refused: not a plain torch file of tensors, numbers and "
                          "strings (torch.load with weights_only=True: Trying to load unsupported GLOBAL",
                          "system")
    assert not marker.exists()
    # data the weights-only unpickler admits but that is not plain: a Parameter, a dtype, a nested dict
    assert_one_line_error(case({**good, "importance_matrix_mean": torch.nn.Parameter(good["importance_matrix_mean"])}),
                          "entry 'importance_matrix_mean' is a Parameter, not a plain tensor")
    assert_one_line_error(case({**good, "dtype": torch.bfloat16}), "entry 'dtype' is a dtype")
    assert_one_line_error(case({**good, "extra": {"a": 1}}), "entry 'extra' is a dict")
    assert_one_line_error(case([good]), "holds a list, not a dict of scores")
    (folder.parent / "garbage").mkdir()
    (folder.parent / "garbage" / "lm_head.pt").write_bytes(b"not a torch file")
    assert_one_line_error(run("import-scores", folder.parent / "garbage", "--base", llama_dir, "--out", out),
                          "lm_head.pt: refused: not a plain torch file")
    # contents that disagree with the file, the scheme or BASE
    assert_one_line_error(case(good, "llm_1_self_attn_q_proj.pt"),
                          "holds the scores of 'llm.0.self_attn.q_proj', which the released scripts save as "
                          "llm_0_self_attn_q_proj.pt")
    assert_one_line_error(case({**good, "importance_matrix_mean": good["importance_matrix_mean"].double()}),
                          "must be a 2-D float32, bfloat16 or float16 tensor")
    nan = good["importance_matrix_mean"].clone()
    nan[0, 0] = float("nan")
    assert_one_line_error(case({**good, "importance_matrix_mean": nan}), "holds NaN or infinite scores")
    assert_one_line_error(case({**good, "W_shape": torch.Size([1, 2])}), "W_shape [1, 2] differs")
    assert_one_line_error(case({**good, "name": "llm.9.self_attn.q_proj"}, "llm_9_self_attn_q_proj.pt"),
                          "scores 'llm.9.self_attn.q_proj', which BASE does not have")
    wrong = {**good, "importance_matrix_mean": torch.rand(7, 5), "W_shape": torch.Size([7, 5])}
    assert_one_line_error(case(wrong), "with shape [7, 5], but BASE's 'model.layers.0.self_attn.q_proj.weight' is")
    assert_one_line_error(case({**good, "W_fro": good["W_fro"] * 1.1}),
                          "these scores are not of this BASE")
    assert not out.exists() and not list(tmp_path.glob(".out.dowser.safetensors.*"))
    # scores of another model with the same shapes: its norms give it away
    other = make_llama(tmp_path / "other", seed=1)
    r = run("import-scores", _scores_of(other, tmp_path / "other-scores"), "--base", llama_dir, "--out", out)
    assert_one_line_error(r, "was scored on weights of Frobenius norm")
    # folders, options and outputs
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("import-scores", empty, "--base", llama_dir, "--out", out), "holds no *.pt score files")
    assert_one_line_error(run("import-scores", folder, "--out", out), "missing --base")
    assert_one_line_error(run("import-scores", folder, "--base", llama_dir, "--out", out, "--update-ratio", "0"),
                          "update ratio must be in (0, 1]")
    assert run("import-scores", folder, "--base", llama_dir, "--out", out).exit_code == 0
    assert_one_line_error(run("import-scores", folder, "--base", llama_dir, "--out", out), "already exists")


def test_export_refusals(tmp_path, llama_dir):
    bare = tmp_path / "bare.dowser.safetensors"
    probe(str(llama_dir), str(bare), settings=ProbeSettings(save_stats=False, **SETTINGS), progress=False)
    assert_one_line_error(run("export-scores", bare, "--out", tmp_path / "x"), "holds no score statistics")
    assert not (tmp_path / "x").exists()
    masks = {"model.embed_tokens.weight": torch.rand(96, 32) < 0.9}
    embed = write_sidecar(tmp_path / "embed.dowser.safetensors",
                          SidecarData(masks, psi={"model.embed_tokens.weight": torch.rand(1, 96)},
                                      a={"model.embed_tokens.weight": torch.rand(1, 32)}, update_weights=torch.ones(1),
                                      info={"base_model": {"id": str(llama_dir)}}))
    assert_one_line_error(run("export-scores", embed, "--out", tmp_path / "x"),
                          "'model.embed_tokens.weight' has no name in the released scripts' format")
    assert not (tmp_path / "x").exists()


def test_full_score_format_rules(tmp_path):
    """A sidecar holds psi/a statistics or full scores, never both; full scores must cover every mask with
    the mask's shape; old readers see no statistics (has_stats false), so nothing re-cuts wrongly."""
    masks = {"w": torch.rand(4, 6) < 0.9}
    with pytest.raises(ValueError, match="not both"):
        write_sidecar(tmp_path / "a.dowser.safetensors", SidecarData(masks, psi={"w": torch.rand(1, 4)},
                                                                     a={"w": torch.rand(1, 6)},
                                                                     update_weights=torch.ones(1),
                                                                     scores={"w": torch.rand(4, 6)}))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 of shape"):
        write_sidecar(tmp_path / "a.dowser.safetensors", SidecarData(masks, scores={"w": torch.rand(6, 4)}))
    p = write_sidecar(tmp_path / "s.dowser.safetensors", SidecarData(masks, scores={"w": torch.rand(4, 6)}))
    header = json.loads(p.read_bytes()[8:8 + int.from_bytes(p.read_bytes()[:8], "little")])
    assert header["__metadata__"]["has_stats"] == "false" and header["__metadata__"]["has_scores"] == "true"
    # a file claiming scores it lacks, or holding both kinds, is refused on opening
    from safetensors.torch import save_file

    tensors = load_file(p)
    meta = header["__metadata__"]
    save_file({k: v for k, v in tensors.items() if not k.startswith("score/")}, tmp_path / "lacks.dowser.safetensors",
              metadata=meta)
    with pytest.raises(DowserError, match="score of 'w' is missing"):
        Sidecar(tmp_path / "lacks.dowser.safetensors")
    save_file({**tensors, "psi/w": torch.rand(1, 4), "a/w": torch.rand(1, 6), "stats/update_weights": torch.ones(1)},
              tmp_path / "both.dowser.safetensors", metadata={**meta, "has_stats": "true"})
    with pytest.raises(DowserError, match="holds both score statistics .* and full scores"):
        Sidecar(tmp_path / "both.dowser.safetensors")
    with pytest.raises(DowserError, match="holds full score matrices"):
        Sidecar(p).stats("w")
