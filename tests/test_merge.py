"""dowser merge: exact bits, layouts, LoRA adapters, provenance, strengths and bad inputs.

Expected outputs are assembled here by hand (plain torch indexing on fully loaded
state dicts), independently of the streaming code under test.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dowser_tool import DowserError
from dowser_tool.cli import main
from dowser_tool.repair.merge import DEFAULT_RESTORE, merge_checkpoint
from dowser_tool.model.keys import KeyRules
from dowser_tool.score import cut_mask, score_matrix
from dowser_tool.sidecar.file import SidecarData, write_sidecar

from .models import make_llama, make_llava

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- helpers ---------------------------------------------------------
def state_dict(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def make_mask(base_dir, path, *, stats=True, extra=(), sha=None, update_ratio=0.1, rename=lambda n: n, seed=0):
    """A sidecar over BASE's decoder linears (+ extra names), cut at update_ratio from random statistics."""
    sd = state_dict(base_dir)
    names = [n for n in sd if n.endswith(".weight") and n.split(".")[-2] in LINEARS] + list(extra)
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([3.0, 1.0])
    masks, psi, a = {}, {}, {}
    for n in names:
        out_dim, in_dim = sd[n].shape
        psi[n], a[n] = torch.rand(2, out_dim, generator=g), torch.rand(2, in_dim, generator=g)
        masks[n] = cut_mask(score_matrix(sd[n], psi[n], a[n], w), update_ratio)
    ren = {rename(n): n for n in names}
    data = SidecarData(
        masks={k: masks[v] for k, v in ren.items()},
        psi={k: psi[v] for k, v in ren.items()} if stats else {},
        a={k: a[v] for k, v in ren.items()} if stats else {},
        update_weights=w if stats else None,
        info={"base_model": {"id": str(base_dir), "revision": None, "sha": sha}, "update_ratio": update_ratio},
    )
    return write_sidecar(path, data), {v: (psi[v], a[v], w) for v in names}


def expected(base_sd, ft_sd, stats, restore, match=lambda n: n):
    """FT's state dict with the top-`restore` entries of each masked BASE matrix put back (by hand)."""
    out = {}
    for name, ft in ft_sd.items():
        base_name = match(name)
        if base_name not in stats:
            out[name] = ft
            continue
        base = base_sd[base_name]
        protect = cut_mask(score_matrix(base, *stats[base_name]), 1 - restore)
        t = ft.clone()
        t[protect] = base.to(ft.dtype)[protect]
        out[name] = t
    return out


def assert_output(out_dir, want: dict[str, torch.Tensor]):
    got = state_dict(out_dir)
    assert set(got) == set(want)
    for n in want:
        assert same_bits(got[n], want[n]), n
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for n, f in weight_map.items():
            with safe_open(str(out_dir / f), "pt") as h:
                assert n in h.keys()
        assert set(weight_map) == set(want)


def logits(folder_or_model, ids):
    from transformers import AutoModelForCausalLM

    model = folder_or_model
    if isinstance(folder_or_model, Path):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def hand_model(config_dir, sd):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.float()


def run_cli(*args):
    result = CliRunner().invoke(main, ["merge", *map(str, args)])
    return result.exit_code, result.output


IDS = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))


# ---- exact merges ----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_exact_bits_across_shard_layouts(tmp_path, dtype):
    base = make_llama(tmp_path / "base", seed=0, dtype=dtype)  # one file
    ft = make_llama(tmp_path / "ft", seed=1, dtype=dtype, shard_size="8KB")  # several shards
    (ft / "tokenizer_config.json").write_text("{}")
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors")
    code, out = run_cli("--base", base, "--finetuned", ft, "--mask", mask, "--out", tmp_path / "out", "-q")
    assert code == 0, out
    assert "tensors restored" in out and "entries restored" in out
    want = expected(state_dict(base), state_dict(ft), stats, DEFAULT_RESTORE)
    assert_output(tmp_path / "out", want)
    # FT's layout is kept; shards without a masked tensor are byte-for-byte copies
    ft_index = json.loads((ft / "model.safetensors.index.json").read_text())["weight_map"]
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert ft_index == out_index
    untouched = set(ft_index.values()) - {ft_index[n] for n in stats}
    assert untouched
    for f in untouched:
        assert (tmp_path / "out" / f).read_bytes() == (ft / f).read_bytes()
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    record = json.loads((tmp_path / "out" / "dowser_repair.json").read_text())
    assert record["restore"] == DEFAULT_RESTORE and record["finetuned"]["kind"] == "full"
    assert record["tensors_restored"] == len(stats)
    assert record["entries_restored"] == sum(round(DEFAULT_RESTORE * want[n].numel()) for n in stats)
    # the output loads and computes what the hand-assembled model computes
    assert torch.equal(logits(tmp_path / "out", IDS), logits(hand_model(ft, want), IDS))


def test_strengths_reshard_dtype_and_update_ratio(tmp_path):
    base = make_llama(tmp_path / "base", seed=0, shard_size="40KB")
    ft = make_llama(tmp_path / "ft", seed=1, dtype=torch.bfloat16)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors", extra=["lm_head.weight"])
    summaries = merge_checkpoint(base, ft, mask, tmp_path / "out", restore="0.1,0.5", progress=False)
    assert [s.out.name for s in summaries] == ["out-r0.1", "out-r0.5"]
    base_sd, ft_sd = state_dict(base), state_dict(ft)
    for r in (0.1, 0.5):
        assert_output(tmp_path / f"out-r{r}", expected(base_sd, ft_sd, stats, r))
    assert not (tmp_path / "out").exists()
    # --update-ratio R is --restore 1-R; --dtype converts; --shard-size re-shards
    (s,) = merge_checkpoint(base, ft, mask, tmp_path / "f32", update_ratio=0.5, dtype="float32",
                            shard_size=60_000, progress=False)
    assert s.restore == 0.5
    want = expected(base_sd, {k: v.float() for k, v in ft_sd.items()}, stats, 0.5)
    assert_output(tmp_path / "f32", want)
    assert len(list((tmp_path / "f32").glob("model-*.safetensors"))) > 1
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def llava_in_memory_layout(src: Path, dst: Path) -> Path:
    """The same LLaVA saved under its in-memory names (model.language_model.*) instead of legacy keys."""
    arch = KeyRules.of_config(json.loads((src / "config.json").read_text()), str(src))
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    sd = state_dict(src)
    save_file({arch.canonical(k): v for k, v in sd.items()}, dst / "model.safetensors", {"format": "pt"})
    return dst


def test_llava_layouts(tmp_path):
    base = make_llava(tmp_path / "base", seed=0)  # legacy keys, as save_pretrained writes them
    ft = llava_in_memory_layout(make_llava(tmp_path / "ft-legacy", seed=1), tmp_path / "ft")
    arch = KeyRules.of_config(json.loads((base / "config.json").read_text()), str(base))
    # the mask names tensors by their canonical names (a third spelling of BASE's legacy keys)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors", rename=arch.canonical)
    merge_checkpoint(base, ft, mask, tmp_path / "out", progress=False)
    legacy = {arch.canonical(n): n for n in state_dict(base)}
    want = expected(state_dict(base), state_dict(ft), stats, DEFAULT_RESTORE, match=lambda n: legacy[n])
    assert_output(tmp_path / "out", want)
    assert any(n.startswith("model.language_model.layers.") for n in want)  # FT's names are kept
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    params = dict(model.named_parameters())
    assert all(same_bits(params[n], want[n]) for n in want if n in params)


def test_tied_embeddings(tmp_path):
    base = make_llama(tmp_path / "base", seed=0, tie=True)
    ft = make_llama(tmp_path / "ft", seed=1, tie=True)
    assert "lm_head.weight" not in state_dict(ft)
    # a mask scored on the head: in a tied model it restores the shared embedding
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors", extra=["model.embed_tokens.weight"],
                            rename=lambda n: "lm_head.weight" if n == "model.embed_tokens.weight" else n)
    (s,) = merge_checkpoint(base, ft, mask, tmp_path / "out", progress=False)
    want = expected(state_dict(base), state_dict(ft), stats, DEFAULT_RESTORE)
    assert_output(tmp_path / "out", want)
    assert s.tensors_restored == len(stats)
    assert torch.equal(logits(tmp_path / "out", IDS), logits(hand_model(ft, want), IDS))


def test_resized_vocabulary_restores_shared_rows(tmp_path, capsys):
    base = make_llama(tmp_path / "base", seed=0)
    ft = make_llama(tmp_path / "ft", seed=1, vocab=100)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors", extra=["lm_head.weight"])
    merge_checkpoint(base, ft, mask, tmp_path / "out", progress=False)
    assert "resized vocabulary" in capsys.readouterr().err
    base_sd, ft_sd = state_dict(base), state_dict(ft)
    got = state_dict(tmp_path / "out")["lm_head.weight"]
    protect = cut_mask(score_matrix(base_sd["lm_head.weight"], *stats["lm_head.weight"]), 1 - DEFAULT_RESTORE)
    want = ft_sd["lm_head.weight"].clone()
    want[:96][protect] = base_sd["lm_head.weight"][protect]
    assert same_bits(got, want)


# ---- LoRA ------------------------------------------------------------
def write_adapter(folder: Path, base_sd, *, r=4, alpha=8.0, rslora=False, fan_in_fan_out=False,
                  rank_pattern=None, alpha_pattern=None, targets=("q_proj", "v_proj", "o_proj")):
    """A PEFT adapter folder written by hand, in PEFT's saved key naming."""
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, w in base_sd.items():
        module = name[: -len(".weight")]
        if module.split(".")[-1] not in targets:
            continue
        rank = (rank_pattern or {}).get(module.split(".")[-1], r)
        out_dim, in_dim = w.shape[::-1] if fan_in_fan_out else w.shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "fan_in_fan_out": fan_in_fan_out,
              "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}, "target_modules": list(targets),
              "base_model_name_or_path": "tiny"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text('{"from": "adapter"}')
    return folder, tensors


@pytest.mark.parametrize("rslora,fan_in_fan_out", [(False, False), (True, True)])
def test_lora_adapter(tmp_path, rslora, fan_in_fan_out):
    base = make_llama(tmp_path / "base", seed=0, dtype=torch.bfloat16, shard_size="40KB")
    base_sd = state_dict(base)
    # fan_in_fan_out stores weights (in, out): tested on the square attention matrices
    targets = ("q_proj", "o_proj") if fan_in_fan_out else ("q_proj", "v_proj", "o_proj", "up_proj")
    adapter, lora = write_adapter(tmp_path / "adapter", base_sd, rslora=rslora, fan_in_fan_out=fan_in_fan_out,
                                  rank_pattern={"q_proj": 2}, alpha_pattern={"o_proj": 16.0}, targets=targets)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors")
    (s,) = merge_checkpoint(base, adapter, mask, tmp_path / "out", restore=0.3, progress=False)
    # by hand: W + scale * B @ A, scale = alpha / r (or / sqrt(r)), per-module r and alpha
    merged = dict(base_sd)
    for name, w in base_sd.items():
        key = f"base_model.model.{name[: -len('.weight')]}"
        if f"{key}.lora_A.weight" not in lora:
            continue
        A, B = lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"]
        r = A.shape[0]
        alpha = 16.0 if ".o_proj" in name else 8.0
        delta = (B @ A) * (alpha / (math.sqrt(r) if rslora else r))
        # oriented by the layout of the weight it updates, as peft's merge_and_unload does: Llama's
        # nn.Linear weights are (out, in) whatever the file's one fan_in_fan_out flag says (peft resets
        # it per module; issue 22 failure 3). GPT-2's Conv1D: tests/test_merge_inputs.py.
        merged[name] = w + delta.to(w.dtype)
    want = expected(base_sd, merged, stats, 0.3)
    assert_output(tmp_path / "out", want)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    assert json.loads((tmp_path / "out" / "dowser_repair.json").read_text())["finetuned"]["kind"] == "lora-adapter"
    assert torch.equal(logits(tmp_path / "out", IDS), logits(hand_model(base, want), IDS))


def test_lora_key_names():
    rules = KeyRules.of_config({"model_type": "llava"}, "llava")
    assert rules.lora_target("base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight") == (
        "model.language_model.layers.0.mlp.up_proj.weight", "A", "model.language_model.layers.0.mlp.up_proj")
    assert rules.lora_target("base_model.model.language_model.model.layers.1.self_attn.q_proj.lora_B.default.weight"
                             )[:2] == ("model.language_model.layers.1.self_attn.q_proj.weight", "B")
    assert KeyRules(None).lora_target("base_model.model.model.embed_tokens.lora_embedding_A")[1] == "embedding_A"
    assert KeyRules(None).lora_target("base_model.model.lm_head.weight") is None


# ---- provenance, no statistics, bad inputs ----------------------------
def test_provenance_mismatch_on_hub(hub, tmp_path):
    base = make_llama(tmp_path / "base", seed=0)
    ft = make_llama(tmp_path / "ft", seed=1)
    sha = hub.add_repo("org/base", base)
    good, stats = make_mask(base, tmp_path / "good.dowser.safetensors", sha=sha)
    bad, _ = make_mask(base, tmp_path / "bad.dowser.safetensors", sha="f" * 40)
    code, out = run_cli("--base", "org/base", "--finetuned", ft, "--mask", bad, "--out", tmp_path / "out")
    assert code == 1 and "probed on" in out and "--force" in out and not (tmp_path / "out").exists()
    merge_checkpoint("org/base", ft, bad, tmp_path / "forced", force=True, progress=False)
    merge_checkpoint("org/base", ft, good, tmp_path / "out", progress=False)
    assert_output(tmp_path / "out", expected(state_dict(base), state_dict(ft), stats, DEFAULT_RESTORE))
    record = json.loads((tmp_path / "out" / "dowser_repair.json").read_text())
    assert record["base"]["sha"] == sha and record["mask"]["base_model"]["sha"] == sha


def test_finetuned_on_hub(hub, tmp_path):
    base = make_llama(tmp_path / "base", seed=0)
    ft = make_llama(tmp_path / "ft", seed=1, shard_size="8KB")
    sha = hub.add_repo("org/ft", ft, tags=["v1"])
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors")
    merge_checkpoint(base, "org/ft", mask, tmp_path / "out", finetuned_revision="v1", progress=False)
    assert_output(tmp_path / "out", expected(state_dict(base), state_dict(ft), stats, DEFAULT_RESTORE))
    assert json.loads((tmp_path / "out" / "dowser_repair.json").read_text())["finetuned"]["sha"] == sha


def test_without_statistics_only_the_own_mask(tmp_path, capsys):
    base = make_llama(tmp_path / "base", seed=0)
    ft = make_llama(tmp_path / "ft", seed=1)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors", stats=False, update_ratio=0.25)
    with pytest.raises(DowserError, match="no score statistics"):
        merge_checkpoint(base, ft, mask, tmp_path / "out", restore=0.3, progress=False)
    (s,) = merge_checkpoint(base, ft, mask, tmp_path / "out", progress=False)
    assert "applying its own mask" in capsys.readouterr().err and s.restore is None
    assert_output(tmp_path / "out", expected(state_dict(base), state_dict(ft), stats, 0.75))


def test_own_strength_applies_the_stored_masks(tmp_path):
    base = make_llama(tmp_path / "base", seed=0)
    ft = make_llama(tmp_path / "ft", seed=1)
    mask, stats = make_mask(base, tmp_path / "m.dowser.safetensors", update_ratio=0.2)
    # stored masks that no re-cut would give: the tool must use them as they are at restore 0.8
    from dowser_tool.sidecar.file import Sidecar

    data = Sidecar(mask).read_all()
    g = torch.Generator().manual_seed(5)
    data.masks = {n: torch.rand(m.shape, generator=g) < 0.8 for n, m in data.masks.items()}
    write_sidecar(mask, data)
    (s,) = merge_checkpoint(base, ft, mask, tmp_path / "out", restore=0.8, progress=False)
    base_sd, want = state_dict(base), state_dict(ft)
    for n, m in data.masks.items():
        want[n][m] = base_sd[n][m]
    assert_output(tmp_path / "out", want)
    assert s.restore == 0.8


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    from dowser_tool.repair import merge as merge_module
    base = make_llama(tmp_path / "base", seed=0)
    ft = make_llama(tmp_path / "ft", seed=1)
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors")

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module.Merge, "_value", stop)
    code, out = run_cli("--base", base, "--finetuned", ft, "--mask", mask, "--out", tmp_path / "out")
    assert code == 130 and sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "m.dowser.safetensors"]


def test_missing_option_one_line(tmp_path):
    code, out = run_cli("--base", tmp_path, "--out", tmp_path / "out")
    assert code == 1 and out.strip() == "error: missing --finetuned, --mask (see dowser merge --help)"


@pytest.fixture(scope="module")
def bad_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    base = make_llama(tmp / "base", seed=0)
    ft = make_llama(tmp / "ft", seed=1)
    mask, _ = make_mask(base, tmp / "m.dowser.safetensors")
    other = make_llama(tmp / "wide", seed=0, hidden=48)
    wrong_shape, _ = make_mask(other, tmp / "wide.dowser.safetensors")
    make_llava(tmp / "llava")  # ({"finetuned": "llava"}, ...) below: another architecture
    pickled = tmp / "pickled"
    shutil.copytree(ft, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(state_dict(ft), pickled / "pytorch_model.bin")
    bad_rank, _ = write_adapter(tmp / "bad-rank", state_dict(base), rank_pattern={"q_proj": 2}, targets=("q_proj",))
    cfg = json.loads((bad_rank / "adapter_config.json").read_text())
    (bad_rank / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {}}))
    dora, _ = write_adapter(tmp / "dora", state_dict(base), targets=("q_proj",))
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {}, "use_dora": True}))
    write_adapter(tmp / "wrong-base", state_dict(other), targets=("up_proj",))
    (tmp / "not-a-mask.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:4096])
    (tmp / "exists").mkdir()
    return tmp


BAD = [
    ({"base": "absent"}, "no such folder"),
    ({"finetuned": "absent"}, "no such folder"),
    ({"mask": "nope.dowser.safetensors"}, "no such file"),
    ({"mask": "not-a-mask.safetensors"}, "truncated"),
    ({"out": "exists"}, "already exists"),
    ({"out": "ft/sub"}, "must not be inside"),
    ({"out": "base"}, "must not be inside"),
    ({"out": "ft/config.json"}, "must not be inside"),
    ({"mask": "ft"}, "no such file"),
    ({"restore": "1.5"}, "must be in [0, 1]"),
    ({"restore": "x"}, "comma list"),
    ({"restore": "0.3", "update-ratio": "0.7"}, "not both"),
    ({"mask": "wide.dowser.safetensors"}, "in the mask but"),
    ({"finetuned": "llava"}, "model_type"),
    ({"finetuned": "pickled"}, "--allow-pickle"),
    ({"finetuned": "bad-rank"}, "gives it rank"),
    ({"finetuned": "dora"}, "DoRA"),
    ({"finetuned": "wrong-base"}, "is this adapter for this base model"),
    ({"shard-size": "lots"}, "cannot read size"),
    ({"dtype": "int8"}, "int8"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[next(iter(c)) + ":" + m for c, m in BAD])
def test_bad_inputs_one_line_no_output(bad_setup, change, message):
    tmp = bad_setup
    opts = {"base": "base", "finetuned": "ft", "mask": "m.dowser.safetensors", "out": "out", **change}
    args = []
    for key, value in opts.items():
        args += [f"--{key}", value if key in ("restore", "update-ratio", "shard-size", "dtype") else tmp / value]
    before = sorted(p.name for p in tmp.iterdir())
    code, out = run_cli(*args, "-q")
    assert code != 0 and message in out, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert sorted(p.name for p in tmp.iterdir()) == before and not (tmp / "out").exists()


def test_sigterm_mid_merge_leaves_nothing(tmp_path):
    """A real SIGTERM while the output is being written: exit 130, no DIR, no temporary folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base = make_llama(tmp_path / "base", seed=0, hidden=512, layers=8, shard_size="20MB")
    ft = make_llama(tmp_path / "ft", seed=1, hidden=512, layers=8, shard_size="20MB")
    mask, _ = make_mask(base, tmp_path / "m.dowser.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dowser_tool", "merge", "--base", str(base), "--finetuned", str(ft),
                             "--mask", str(mask), "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 120:  # wait until the temporary output folder holds a shard being written
        tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        if tmp and any(f.suffix == ".safetensors" for f in tmp[0].iterdir()):
            break
        assert proc.poll() is None, "merge finished before it could be interrupted: " + proc.stderr.read()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- interpolation (WiSE-FT) -------------------------------------------
def test_interpolate_every_shared_tensor_without_a_mask(tmp_path):
    base = make_llama(tmp_path / "base", seed=0, dtype=torch.bfloat16, shard_size="40KB")
    ft = make_llama(tmp_path / "ft", seed=1, dtype=torch.bfloat16, shard_size="40KB")
    code, out = run_cli("--base", base, "--finetuned", ft, "--out", tmp_path / "out", "--interpolate", "0,0.3,1", "-q")
    assert code == 0, out
    assert "interpolate 0.3" in out and "tensors interpolated" in out
    base_sd, ft_sd = state_dict(base), state_dict(ft)
    assert_output(tmp_path / "out-a0", base_sd)  # alpha 0 is BASE, 1 is FT, bit for bit
    assert_output(tmp_path / "out-a1", ft_sd)
    want = {n: torch.lerp(base_sd[n].float(), t.float(), 0.3).to(t.dtype) for n, t in ft_sd.items()}
    assert_output(tmp_path / "out-a0.3", want)
    record = json.loads((tmp_path / "out-a0.3" / "dowser_repair.json").read_text())
    assert record["repair"] == {"method": "interpolate", "alpha": 0.3} and record["mask"] is None
    assert torch.equal(logits(tmp_path / "out-a0.3", IDS), logits(hand_model(base, want), IDS))


def test_interpolate_an_adapter_scales_its_update(tmp_path):
    base = make_llama(tmp_path / "base", seed=0, dtype=torch.float32)
    base_sd = state_dict(base)
    adapter, lora = write_adapter(tmp_path / "adapter", base_sd, targets=("q_proj",))
    (s,) = merge_checkpoint(base, adapter, None, tmp_path / "out", interpolate=0.5, progress=False)
    merge_checkpoint(base, adapter, None, tmp_path / "full", interpolate=1.0, progress=False)
    got, merged = state_dict(tmp_path / "out"), state_dict(tmp_path / "full")
    for n, w in base_sd.items():
        assert same_bits(got[n], torch.lerp(w, merged[n], 0.5)), n


@pytest.mark.parametrize("args,message", [
    (["--interpolate", "0.5", "--restore", "0.1"], "not both"),
    (["--interpolate", "1.5"], "must be in [0, 1]"),
    (["--restore", "0.1"], "missing --mask"),
])
def test_interpolate_bad_options(tmp_path, llama_dir, args, message):
    code, out = run_cli("--base", llama_dir, "--finetuned", llama_dir, "--out", tmp_path / "o", *args)
    assert code == 1 and message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "o").exists()
