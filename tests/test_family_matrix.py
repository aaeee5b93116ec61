"""Every family in the matrix: probe, merge, load and protect work with no per-family code.

For each family (tests/families.py, built from transformers configs at tiny size): the probe
keeps exactly round(rho * numel) entries of each matrix trainable; `dowser merge` gives protected
entries BASE's bits and the others FT's; the output loads with `from_pretrained` and holds exactly
those values; `protect` keeps protected entries bit-identical under AdamW with weight decay; every
Linear/Conv1D weight and every 3-D expert stack of every decoder layer of the model in memory is
scored or listed in the sidecar's `unscored` with its reason (issue 21).
Streamed statistics equal the in-memory oracle on the families whose layers differ.
"""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from dowser_tool import Sidecar, open_checkpoint, protect
from dowser_tool.model.keys import KeyRules
from dowser_tool.repair.merge import merge_checkpoint
from dowser_tool.probe.run import ProbeRun, ProbeSettings, probe
from dowser_tool.score import trainable_count

from .families import FAMILIES, build, build_fine_tune
from .oracle import assert_run_matches_oracle

RHO = 0.25
NVILA = ("nvila_folder", "nvila_hf")
SETTINGS = dict(probes=4, probe_len=8, batch_size=2, draws=2, update_ratio=RHO)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(ints[a.element_size()]), b.contiguous().view(ints[b.element_size()]))


def in_memory(name, folder, base=False):
    """The model as users load it: its transformers class (NVILA: the Qwen2 LLM, as VILA holds it
    under `llm`), float32."""
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification,
                              Qwen2ForCausalLM)

    if name == "nvila_folder":
        return torch.nn.ModuleDict({"llm": Qwen2ForCausalLM.from_pretrained(folder / "llm", dtype=torch.float32)})
    if name == "nvila_hf":
        from transformers import Qwen2Config

        cfg = Qwen2Config(**json.loads((folder / "config.json").read_text())["text_config"])
        llm = Qwen2ForCausalLM(cfg)
        sd = {k[len("llm."):]: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith("llm.")}
        llm.load_state_dict(sd, strict=True)
        return torch.nn.ModuleDict({"llm": llm.float()})
    kind = FAMILIES[name].kind
    if kind == "reward":  # a reward model; from BASE (a causal LM, `base`) a new score head replaces lm_head
        model, info = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32, num_labels=1,
                                                                         output_loading_info=True)
        allowed = ({"score.weight"}, {"lm_head.weight"}) if base else (set(), set())
        assert (set(info["missing_keys"]), set(info["unexpected_keys"])) == allowed, info
        return model
    auto = AutoModelForCausalLM if kind == "text" else AutoModelForImageTextToText
    model, info = auto.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


def expected_output(base, ft, sidecar) -> dict[str, torch.Tensor]:
    """FT's tensors with the sidecar's protected entries taken from BASE (same names on both sides)."""
    out = {n: ft.read(n) for n in ft.tensor_names()}
    for n in sidecar.names:
        target = n
        if n not in out:  # a tied head's mask, stored under the embedding's name
            raise AssertionError(f"{n} not in FT")
        m = sidecar.mask(n)
        out[target] = torch.where(m, base.read(n), out[target])
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_probe_merge_load_protect(tmp_path, name):
    base_dir = build(name, tmp_path / "base", seed=0)
    ft_dir = build_fine_tune(name, base_dir, tmp_path / "ft")
    mask = tmp_path / "m.dowser.safetensors"
    reward = FAMILIES[name].kind == "reward"  # its fine-tune has no lm_head: a mask over it would be refused
    probe(str(base_dir), str(mask), settings=ProbeSettings(include=() if reward else ("lm_head",), **SETTINGS),
          progress=False)
    sc = Sidecar(mask)
    assert sc.names and (sc.roles or reward)  # the head's mask knows its role
    for n in sc.names:  # exact per matrix; per expert for a stored 3-D expert stack
        m = sc.mask(n)
        for s in (m if m.dim() == 3 else [m]):
            assert int((~s).sum()) == trainable_count(s.numel(), RHO), n

    # merge at the sidecar's own strength: protected entries are BASE's bits, the rest FT's
    out = tmp_path / "out"
    merge_checkpoint(base_dir, ft_dir, mask, out, update_ratio=RHO, progress=False)
    base, ft, got = open_checkpoint(base_dir), open_checkpoint(ft_dir), open_checkpoint(out)
    want = expected_output(base, ft, sc)
    assert set(got.tensor_names()) == set(want)
    for n, t in want.items():
        assert same_bits(got.read(n), t), n

    if name == "nvila_folder":  # only llm/ weights are rewritten; every other file is FT's, byte for byte
        files = [p.relative_to(ft_dir) for p in ft_dir.rglob("*") if p.is_file()]
        kept = [f for f in files if not (str(f).startswith("llm/") and f.suffix == ".safetensors")]
        assert kept and all((out / f).read_bytes() == (ft_dir / f).read_bytes() for f in kept)

    # the output loads as users load it, holding exactly those values
    model = in_memory(name, out)
    rules = KeyRules.of_model(model) if name not in NVILA else KeyRules(None)
    params = dict(model.named_parameters())
    placement = rules.expert_placement({n: tuple(t.shape) for n, t in want.items()})
    for n, t in want.items():
        if n in placement:
            param, e, (r0, r1) = placement[n]
            assert same_bits(params[param].detach()[e, r0:r1], t), n
        elif rules.canonical(n) in params:
            assert same_bits(params[rules.canonical(n)].detach(), t), n

    # protect keeps protected entries bit-identical through AdamW with decoupled weight decay
    model = in_memory(name, base_dir, base=True).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    handle = protect(model, mask)
    assert handle.protected > 0 and handle.trainable > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    llm = model["llm"] if name in NVILA else model
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        llm(input_ids=ids).logits.float().pow(2).mean().backward()  # a reward model's logits: (batch, 1)
        opt.step()
    assert handle.changed() == []
    now = dict(model.named_parameters(remove_duplicate=False))
    moved = [n for n in handle.names if not torch.equal(now[n], before[n])]
    assert moved  # trainable entries did train

    assert_every_decoder_weight_accounted_for(name, model, sc)


def decoder_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(path, layer) of the decoder layers of a model in memory, found independently of the tool: the model's own
    `get_decoder()` (followed while it leads to a decoder of its own: an encoder-decoder language model), then the
    ModuleList of its `_no_split_modules` blocks there."""
    root = model["llm"] if isinstance(model, torch.nn.ModuleDict) else model
    decoder = root.get_decoder()
    while hasattr(decoder, "get_decoder") and decoder.get_decoder() is not decoder:
        decoder = decoder.get_decoder()
    blocks = set(root._no_split_modules)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and type(m[0]).__name__ in blocks and any(x is m for x in decoder.modules())]
    assert len(lists) == 1, [n for n, _ in lists]
    path, layers = lists[0]
    return [(f"{path}.{i}", layer) for i, layer in enumerate(layers)]


def _is_norm(mod) -> bool:
    return isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(mod).__name__.endswith("RMSNorm")


def assert_every_decoder_weight_accounted_for(name, model, sc):
    """Every parameter of every decoder layer of the model in memory is scored, or listed in the sidecar's `unscored`
    with a reason: every Linear/Conv1D weight, every 3-D expert stack (per expert, or the stack), every norm weight and
    bias; nothing is listed as a router but a router, no convolution kernel as an expert stack."""
    from transformers.pytorch_utils import Conv1D

    rules = KeyRules.of_model(model) if name not in NVILA else KeyRules(None)
    unscored = sc.metadata.get("unscored") or {}
    scored = {rules.loads_into(n) for n in sc.names}  # a stored 3-D expert stack: the parameter it loads into
    listed = {rules.loads_into(n): r for n, r in unscored.items()}
    shapes = {n: tuple(sc.mask(n).shape) for n in sc.names}
    experts = {param for param, _, _ in rules.expert_placement(shapes).values()}
    for path, layer in decoder_layers(model):
        for sub, mod in layer.named_modules():
            here = f"{path}.{sub}" if sub else path
            if isinstance(mod, (torch.nn.Linear, Conv1D)):
                w = f"{here}.weight"
                assert w in scored or w in listed, f"{name}: decoder-layer linear {w} is neither scored nor listed"
                if w in listed and listed[w].startswith("router"):
                    assert any(k in type(m).__name__.lower() or k in here.split(".")
                               for m in (mod,) for k in ("router", "gate")), (w, listed[w])
            for pname, p in mod.named_parameters(recurse=False):
                w = f"{here}.{pname}"
                assert w in scored or w in listed or w in experts, f"{name}: decoder-layer tensor {w} is neither scored nor listed"
                if pname == "bias" or _is_norm(mod):
                    assert w in scored or listed.get(w) in ("bias (never scored)", "norm weight (never scored)"), (w, listed.get(w))
                if p.dim() == 3 and not isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
                    assert w in experts or w in scored or w in listed, f"{name}: expert stack {w} is neither scored nor listed"
                if isinstance(mod, torch.nn.Conv1d) and pname == "weight":
                    assert "convolution kernel" in listed.get(w, ""), (w, listed.get(w))
    if FAMILIES[name].kind == "seq2seq":  # the encoder stack is named as not scored, the decoder's as scored
        decoder = decoder_layers(model)[0][0].rpartition(".")[0]
        encoder = {n: r for n, r in unscored.items() if ".encoder.layers." in n}
        assert encoder and all(f"scores the decoder stack {decoder}" in r for r in encoder.values()), encoder
    for n, reason in unscored.items():
        assert reason and not (reason.startswith("fused 3-D") and "conv" in n.rsplit(".", 2)[-2]), (n, reason)


VLMS = [n for n, f in FAMILIES.items() if f.kind == "vlm" and n not in NVILA]


@pytest.mark.parametrize("name", VLMS)
def test_image_probes_through_the_models_processor(tmp_path, name):
    folder = build(name, tmp_path / name)
    out = tmp_path / "img.dowser.safetensors"
    settings = ProbeSettings(images=True, include=("vision", "projector"), **SETTINGS)
    if name == "mistral3" and importlib.util.find_spec("torchvision") is None:
        from dowser_tool import DowserError

        with pytest.raises(DowserError, match="needs a package that is not installed.*[Tt]orchvision"):
            probe(str(folder), str(out), settings=settings, progress=False)
        assert not out.exists()
        return
    probe(str(folder), str(out), settings=settings, progress=False)
    sc = Sidecar(out)
    parts = {sc.metadata["tensor_info"][n]["part"] for n in sc.names}
    assert {"decoder", "vision"} <= parts
    for n in sc.names:
        m = sc.mask(n)
        assert int((~m).sum()) == trainable_count(m.numel(), RHO), n
    assert sc.metadata["probe"]["images"] is True


# Families whose layers differ, fused projections, Conv1D, cross-attention, images into the vision
# tower and projector, experts, NVILA's LLM, Mamba / Mamba2 / short-convolution / gated-DeltaNet layers:
# streamed statistics equal the in-memory oracle.
ORACLE = [("gemma3_text", False), ("qwen2", False), ("phi3", False), ("gpt2", False), ("mllama", True),
          ("qwen2_5_vl", True), ("qwen3_moe", False), ("mixtral", False), ("nvila_folder", False), ("nvila_hf", False),
          ("jamba", False), ("lfm2", False), ("qwen3_next", False), ("florence2", False)]


@pytest.mark.parametrize("name,images", ORACLE)
def test_streamed_statistics_equal_the_oracle(tmp_path, name, images):
    folder = build(name, tmp_path / name)
    include = ("lm_head", "vision", "projector") if images else ("lm_head",)
    settings = ProbeSettings(probes=4, probe_len=10, batch_size=2, draws=2, images=images, include=include,
                             resident="never")
    run = ProbeRun(open_checkpoint(folder), settings, progress=False)
    rec = run.collect()
    if images:
        assert {"vision", "projector"} <= {w.part for w in run.weights}
    model = in_memory(name, folder)
    assert_run_matches_oracle(run, rec, folder, model=model["llm"] if name in NVILA else model)
