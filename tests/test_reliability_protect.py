"""Issue 12, protect(): protected entries equal BASE in every weight the user trains, evaluates or
saves: the effective weight of a LoRA layer, the weight a schedule-free optimizer evaluates, the
trainable copy PEFT makes of a `modules_to_save` module; for every optimizer the Trainer offers
that installs here.
"""

import pytest
import torch

from dowser_tool import DowserError, protect

from .test_merge import make_mask, state_dict
from .test_reliability_merge import tied_qwen  # noqa: F401  (a fixture: tied Qwen2, probed sidecar, untied FT)
from .test_training import (
    STEPS,
    _bits,
    _ListDataset,
    _trainer_args,
    adamw_with_schedule,
    batches,
    in_memory_masks,
    load_model,
    snapshot,
    train,
    write_test_sidecar,
)


@pytest.fixture(scope="module")
def sidecar(llava_dir, tmp_path_factory):
    return write_test_sidecar(llava_dir, tmp_path_factory.mktemp("mask") / "tiny.dowser.safetensors")


def assert_protected_equal(params: dict, before: dict, masks: dict, min_moved=0.5):
    """Every protected entry bit-identical to `before`; most trainable entries moved."""
    for name, mask in masks.items():
        now, then = params[name].detach(), before[name]
        assert torch.equal(_bits(now[mask]), _bits(then[mask])), f"{name}: protected entries moved"
        assert (now[~mask] != then[~mask]).float().mean() > min_moved, f"{name}: trainable entries did not move"


def plain_steps(model, opt):
    """STEPS optimizer steps without a scheduler or clipping (what the optimizer alone does)."""
    for batch in batches(96):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


# ---- 5. LoRA inits that rewrite the base layer; changed() checks the effective weight ------------
def lora(model_dir, init=True):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    return get_peft_model(load_model(model_dir), config)


def effective(module) -> torch.Tensor:
    """W + scale * B @ A, added in W's dtype as merge_and_unload does."""
    w = module.base_layer.weight.detach().clone()
    for adapter in module.lora_A:
        delta = module.lora_B[adapter].weight.float() @ module.lora_A[adapter].weight.float()
        w += (delta * module.scaling[adapter]).to(w.dtype)
    return w


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_5_inits_that_rewrite_the_base_layer_are_refused_untouched(llava_dir, sidecar, init):
    model = lora(llava_dir, init)
    before = snapshot(model)
    with pytest.raises(DowserError, match=f"init_lora_weights={init!r}, which rewrites the base layer"):
        protect(model, sidecar)
    after = snapshot(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # refused before changing anything


def test_5_effective_weight_keeps_pretrained_entries_and_changed_checks_it(llava_dir, sidecar):
    from dowser_tool import open_checkpoint

    model = lora(llava_dir)
    handle = protect(model, sidecar)
    opt, sched = adamw_with_schedule(model.parameters())
    train(model, opt, sched, batches(96))
    assert handle.changed() == []
    ckpt = open_checkpoint(llava_dir)
    modules = dict(model.named_modules())
    for module_name, axes in handle.lora.items():
        ckpt_name = module_name.removeprefix("base_model.model.").replace(
            "model.language_model.", "language_model.model.") + ".weight"
        pretrained, now = ckpt.read(ckpt_name), effective(modules[module_name])
        outside = ~axes.submatrix()
        assert torch.equal(_bits(now[outside]), _bits(pretrained[outside])), module_name
        assert (now[~outside] != pretrained[~outside]).float().mean() > 0.5
    # the check is about the effective weight: a moved base layer or a nonzero protected row of B shows
    name, module = next((n, modules[n]) for n in handle.lora)
    with torch.no_grad():
        module.base_layer.weight[~handle.lora[name].submatrix()] += 1.0
    assert handle.changed() == [f"{name}.base_layer.weight"]
    handle.remove()


# ---- 6. optimizers: state that is not a gradient statistic is not zeroed blindly --------------
TRAINER_OPTIMIZERS = ["adamw_torch", "adafactor", "sgd", "schedule_free_adamw", "schedule_free_sgd",
                      "schedule_free_radam", "adamw_bnb_8bit"]
NEEDS = {"schedule_free": "schedulefree", "bnb": "bitsandbytes"}


@pytest.mark.parametrize("optim", TRAINER_OPTIMIZERS)
def test_6_trainer_optimizers_keep_protected_entries_in_evaluated_and_saved_weights(
        llava_dir, sidecar, tmp_path, optim):
    pytest.importorskip("accelerate")
    for key, package in NEEDS.items():
        if key in optim:
            pytest.importorskip(package)
    from safetensors.torch import load_file
    from transformers import Trainer

    from dowser_tool.train.callback import DowserCallback

    model = load_model(llava_dir)
    before = snapshot(model)
    items = [{"input_ids": x, "labels": x} for b in batches(96, STEPS) for x in b["input_ids"]]
    args = _trainer_args(tmp_path / "run")
    args.optim, args.learning_rate = optim, 1e-2 if optim != "sgd" else 0.5
    if optim == "schedule_free_radam":
        args.max_steps = 2 * STEPS  # RAdam's rectification makes no update in its first five steps
    callback = DowserCallback(sidecar)
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(items), eval_dataset=_ListDataset(items[:2]),
                      callbacks=[callback])
    trainer.train()
    trainer.evaluate()  # schedule-free: optimizer.eval() swaps the parameters to the averaged sequence x
    masks = in_memory_masks(sidecar, llava_dir)
    assert callback.handle.changed() == []
    assert_protected_equal(dict(model.named_parameters()), before, masks, min_moved=0.3)
    trainer.save_model(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    from dowser_tool import Sidecar

    side = Sidecar(sidecar)
    base = state_dict(llava_dir)
    for name in side.names:  # the file holds checkpoint names
        mask = side.mask(name)
        assert torch.equal(_bits(saved[name][mask]), _bits(base[name][mask])), name


def test_6_schedule_free_eval_keeps_protected_entries(llava_dir, sidecar):
    schedulefree = pytest.importorskip("schedulefree")
    model = load_model(llava_dir)
    before = snapshot(model)
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2, weight_decay=0.1, warmup_steps=1)
    handle = protect(model, sidecar, optimizer=opt)
    opt.train()
    plain_steps(model, opt)
    params = dict(model.named_parameters())
    masks = in_memory_masks(sidecar, llava_dir)
    for name, mask in masks.items():  # z is a weight sequence: set, not zeroed; exp_avg_sq is zeroed
        state = opt.state[params[name]]
        assert torch.equal(state["z"][mask], before[name][mask]) and (state["exp_avg_sq"][mask] == 0).all()
    opt.eval()  # was: every protected entry multiplied by 1/beta1
    assert handle.changed() == []
    assert_protected_equal(params, before, masks)
    opt.train()
    assert_protected_equal(params, before, masks)


def test_6_eight_bit_adamw_state_is_left_alone_and_entries_stay(llava_dir, sidecar):
    bnb = pytest.importorskip("bitsandbytes")
    model = load_model(llava_dir)
    before = snapshot(model)
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.1, min_8bit_size=1)
    handle = protect(model, sidecar, optimizer=opt)
    plain_steps(model, opt)
    params = dict(model.named_parameters())
    masks = in_memory_masks(sidecar, llava_dir)
    assert all(opt.state[params[n]]["state1"].dtype == torch.uint8 for n in masks)  # really 8-bit state
    assert handle.changed() == []
    assert_protected_equal(params, before, masks)


def test_6_unknown_optimizers_follow_the_documented_rule(llava_dir, sidecar):
    class Averaging(torch.optim.SGD):  # not from a known package, keeps its own per-entry state
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p].setdefault("visits", torch.zeros_like(p)).add_(1)

    class WithEval(Averaging):
        def eval(self):
            pass

    model = load_model(llava_dir)
    with pytest.raises(DowserError, match="own eval"):
        protect(model, sidecar, optimizer=WithEval(model.parameters(), lr=0.1))
    before = snapshot(model)
    opt = Averaging(model.parameters(), lr=0.5, momentum=0.9)
    handle = protect(model, sidecar, optimizer=opt)
    plain_steps(model, opt)
    params = dict(model.named_parameters())
    masks = in_memory_masks(sidecar, llava_dir)
    assert handle.changed() == []
    assert_protected_equal(params, before, masks)
    for name, mask in masks.items():  # unknown state left as it is; momentum (a gradient statistic) zeroed
        state = opt.state[params[name]]
        assert (state["visits"] == STEPS).all() and (state["momentum_buffer"][mask] == 0).all()


# ---- 7. a head trained through PEFT modules_to_save ------------------------------------------------
def test_7_modules_to_save_head_is_protected_in_its_trainable_copy(llama_dir, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    mask_path, _ = make_mask(llama_dir, tmp_path / "m.dowser.safetensors", extra=["lm_head.weight"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir).train(),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    handle = protect(model, mask_path)
    copy = "base_model.model.lm_head.modules_to_save.default.weight"
    assert copy in handle.names
    opt, sched = adamw_with_schedule(model.parameters())
    train(model, opt, sched, batches(96))
    assert handle.changed() == []
    from dowser_tool import Sidecar

    mask, base_head = Sidecar(mask_path).mask("lm_head.weight"), state_dict(llama_dir)["lm_head.weight"]
    head = dict(model.named_parameters())[copy].detach()
    assert torch.equal(head[mask], base_head[mask]) and (head[~mask] != base_head[~mask]).float().mean() > 0.5
    merged = model.merge_and_unload()
    assert torch.equal(merged.lm_head.weight.detach()[mask], base_head[mask])


def test_7_tied_head_role_follows_the_head_into_its_copy(tied_qwen):  # noqa: F811
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, _, sidecar = tied_qwen  # the head's mask is stored under model.embed_tokens.weight
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base).train(),
                           LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    handle = protect(model, sidecar)
    assert "base_model.model.lm_head.modules_to_save.default.weight" in handle.names
    assert not any("embed_tokens" in n for n in handle.names)  # the input embedding is not the head
    opt, sched = adamw_with_schedule(model.parameters())
    train(model, opt, sched, batches(90))
    assert handle.changed() == []
