"""protect(), DowserCallback and the LoRA factorised mask on a tiny LLaVA (issue 5)."""

import pytest
import torch

from dowser_tool import DowserError, open_checkpoint, protect
from dowser_tool.model.keys import KeyRules, NameMap, match_names
from dowser_tool.score import cut_mask, score_matrix
from dowser_tool.sidecar.file import SidecarData, write_sidecar

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS = 4


def write_test_sidecar(model_dir, out, rho=0.25, stats=True, seed=0):
    """A sidecar over the decoder linears of a saved model, keyed by its checkpoint names, with
    random (positive) statistics and the masks they cut, as a probe would write them."""
    ckpt = open_checkpoint(model_dir)
    gen = torch.Generator().manual_seed(seed)
    data = SidecarData(masks={}, update_weights=torch.tensor([4.0, 4.0]) if stats else None)
    for name in ckpt.tensor_names():
        if "language_model" not in name or not name.endswith(".weight") or name.split(".")[-2] not in LINEARS:
            continue
        W = ckpt.read(name)
        psi, a = torch.rand(2, W.shape[0], generator=gen), torch.rand(2, W.shape[1], generator=gen)
        data.masks[name] = cut_mask(score_matrix(W, psi, a, torch.tensor([4.0, 4.0])), rho)
        if stats:
            data.psi[name], data.a[name] = psi, a
    return write_sidecar(out, data)


def load_model(model_dir, dtype=torch.float32):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).train()


def batches(vocab, n=STEPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, 2, 12), generator=gen)
    return [{"input_ids": x, "labels": x} for x in ids]


def adamw_with_schedule(params, steps=STEPS):
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-2, weight_decay=0.1)
    return opt, get_cosine_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=steps)


def train(model, opt, sched, data):
    for batch in data:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def in_memory_masks(sidecar_path, model_dir):
    """The sidecar's masks keyed by in-memory parameter names (the test's own mapping via NameMap)."""
    from dowser_tool import Sidecar

    ckpt = open_checkpoint(model_dir)
    nm = NameMap(ckpt.tensor_names(), KeyRules.of_config(ckpt.config, str(model_dir)))
    side = Sidecar(sidecar_path)
    return {nm.to_canonical(n): side.mask(n) for n in side.names}


def assert_protected_fixed_and_trainable_moved(model, before, masks):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        now, then = params[name].detach(), before[name]
        assert torch.equal(_bits(now[mask]), _bits(then[mask])), f"{name}: protected entries moved"
        moved = (now[~mask] != then[~mask]).float().mean().item()
        assert moved > 0.5, f"{name}: only {moved:.0%} of trainable entries moved"


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.fixture(scope="module")
def sidecar(llava_dir, tmp_path_factory):
    return write_test_sidecar(llava_dir, tmp_path_factory.mktemp("mask") / "tiny.dowser.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_loop_keeps_protected_entries_bit_identical(llava_dir, sidecar, dtype):
    model = load_model(llava_dir, dtype)
    opt, sched = adamw_with_schedule(model.parameters(), steps=STEPS + 1)
    train(model, opt, sched, batches(96, 1, seed=1))  # momentum and step counts from before the mask
    before = snapshot(model)
    handle = protect(model, sidecar)
    train(model, opt, sched, batches(96))
    masks = in_memory_masks(sidecar, llava_dir)
    assert sorted(masks) == handle.names
    assert handle.changed() == []
    assert_protected_fixed_and_trainable_moved(model, before, masks)
    assert handle.trainable == sum(int((~m).sum()) for m in masks.values())
    handle.remove()


def test_remove_restores_normal_training(llava_dir, sidecar):
    model = load_model(llava_dir)
    opt, sched = adamw_with_schedule(model.parameters())
    handle = protect(model, sidecar, optimizer=opt)
    train(model, opt, sched, batches(96, 2))
    assert handle.changed() == []
    handle.remove()
    before = snapshot(model)
    train(model, opt, sched, batches(96, 2, seed=3))
    params = dict(model.named_parameters())
    for name, mask in in_memory_masks(sidecar, llava_dir).items():
        assert (params[name][mask] != before[name][mask]).float().mean() > 0.5
    assert len(handle.changed()) == len(handle.names)


def test_name_mismatched_mask_raises_listing_names(llava_dir):
    model = load_model(llava_dir)
    bad = {"model.layers.7.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(DowserError, match=r"match no parameter.*model\.layers\.7\.mlp\.up_proj\.weight"):
        protect(model, bad)


def test_dict_mask_in_memory_names_and_shape_check(llava_dir):
    model = load_model(llava_dir)
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    W = dict(model.named_parameters())[name]
    handle = protect(model, {name: torch.ones_like(W, dtype=torch.bool)})
    assert handle.names == [name] and handle.trainable == 0
    handle.remove()
    with pytest.raises(DowserError, match="shape"):
        protect(model, {name: torch.ones(2, 2, dtype=torch.bool)})


def test_update_ratio_recuts_from_statistics(llava_dir, sidecar, tmp_path):
    model = load_model(llava_dir)
    handle = protect(model, sidecar, update_ratio=0.5)
    assert handle.trainable == pytest.approx(0.5 * (handle.trainable + handle.protected), abs=len(handle.names))
    handle.remove()
    no_stats = write_test_sidecar(llava_dir, tmp_path / "nostats.dowser.safetensors", stats=False)
    with pytest.raises(DowserError, match="statistics"):
        protect(model, no_stats, update_ratio=0.5)


def test_sharded_parameters_are_refused(llava_dir, sidecar):
    model = load_model(llava_dir)
    dict(model.named_parameters())["model.language_model.layers.0.mlp.up_proj.weight"].ds_id = 7
    with pytest.raises(DowserError, match="sharded"):
        protect(model, sidecar)


def test_match_names_folds_both_layouts():
    arch = KeyRules.of_config({"model_type": "llava"}, "llava")
    ckpt = "language_model.model.layers.0.self_attn.q_proj.weight"
    peft = "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"
    matched, missing = match_names([ckpt, "nope.weight"], [peft, "lm_head.weight"], arch)
    assert matched == {ckpt: peft} and missing == ["nope.weight"]
    assert match_names(["x.weight"], ["base_model.model.x.weight"], KeyRules(None)) == (
        {"x.weight": "base_model.model.x.weight"}, [])


# --- Trainer + DowserCallback -------------------------------------------------------------------


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _trainer_args(out):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
        weight_decay=0.1, warmup_steps=1, lr_scheduler_type="cosine", optim="adamw_torch",
        max_grad_norm=1.0, report_to=[], save_strategy="no", logging_steps=100, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_callback_keeps_protected_entries(llava_dir, sidecar, tmp_path, dtype):
    pytest.importorskip("accelerate")  # the Trainer needs it
    from transformers import Trainer

    from dowser_tool.train.callback import DowserCallback

    class SubclassedTrainer(Trainer):  # as TRL's SFTTrainer is
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    model = load_model(llava_dir, dtype)
    before = snapshot(model)
    items = [{"input_ids": x, "labels": x} for b in batches(96, STEPS) for x in b["input_ids"]]
    callback = DowserCallback(sidecar)
    trainer = SubclassedTrainer(model=model, args=_trainer_args(tmp_path), train_dataset=_ListDataset(items),
                                callbacks=[callback])
    trainer.train()
    assert callback.handle.steps == STEPS and callback.handle.changed() == []
    assert_protected_fixed_and_trainable_moved(model, before, in_memory_masks(sidecar, llava_dir))


# --- PEFT LoRA ------------------------------------------------------------------------------------


def lora_model(model_dir, dtype=torch.float32):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    return get_peft_model(load_model(model_dir, dtype), config)


def lora_delta(module):
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
    return (B.float() @ A.float()) * module.scaling["default"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_delta_is_zero_outside_trainable_rows_and_columns(llava_dir, sidecar, dtype):
    model = lora_model(llava_dir, dtype)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    handle = protect(model, sidecar)
    # q, v and up are adapted; the other masked linears are frozen by PEFT and left alone
    assert len(handle.lora) == 3 * 2 and len(handle.names) == len(handle.lora)
    opt, sched = adamw_with_schedule(model.parameters())
    train(model, opt, sched, batches(96))
    modules = dict(model.named_modules())
    for name, axes in handle.lora.items():
        inside = axes.submatrix()
        assert 0.1 < inside.float().mean() < 0.5  # about the update ratio 0.25
        delta = lora_delta(modules[name])
        assert torch.equal(delta[~inside], torch.zeros_like(delta[~inside]))
        assert (delta[inside] != 0).float().mean() > 0.5
    assert handle.changed() == []
    handle.remove()
    merged = model.merge_and_unload()
    for name, weight in merged.named_parameters():
        key = f"base_model.model.{name}".replace(".weight", ".base_layer.weight")
        module = key[: -len(".base_layer.weight")]
        if module in handle.lora:
            outside = ~handle.lora[module].submatrix()
            assert torch.equal(weight.detach()[outside], base[key][outside])


def test_lora_axis_fraction_from_mask_without_statistics(llava_dir, tmp_path):
    side = write_test_sidecar(llava_dir, tmp_path / "nostats.dowser.safetensors", rho=0.25, stats=False)
    model = lora_model(llava_dir)
    handle = protect(model, side, lora_axis_fraction=0.5)
    for axes in handle.lora.values():
        assert axes.rows.float().mean() == pytest.approx(0.5, abs=0.02)
        assert axes.cols.float().mean() == pytest.approx(0.5, abs=0.02)
    handle.remove()


def test_protected_gradients_and_optimizer_state_are_zero(llava_dir, sidecar):
    model = load_model(llava_dir)
    opt, sched = adamw_with_schedule(model.parameters())
    train(model, opt, sched, batches(96, 1))  # state exists before protect: must be wiped
    protect(model, sidecar, optimizer=opt)
    params = dict(model.named_parameters())
    masks = in_memory_masks(sidecar, llava_dir)
    for name, mask in masks.items():
        assert (opt.state[params[name]]["exp_avg"][mask] == 0).all()
    model(**batches(96, 1, seed=5)[0]).loss.backward()
    for name, mask in masks.items():
        grad = params[name].grad
        assert (grad[mask] == 0).all() and (grad[~mask] != 0).any()
    opt.step()
    for name, mask in masks.items():
        state = opt.state[params[name]]
        assert (state["exp_avg"][mask] == 0).all() and (state["exp_avg_sq"][mask] == 0).all()


def test_callback_enforces_when_the_step_hook_did_not_fire(llava_dir, sidecar, tmp_path):
    from dowser_tool.train.callback import DowserCallback

    model = load_model(llava_dir)
    opt, _ = adamw_with_schedule(model.parameters())
    callback = DowserCallback(sidecar)
    callback.on_train_begin(None, None, None, model=model, optimizer=opt)
    name = next(iter(in_memory_masks(sidecar, llava_dir)))
    with torch.no_grad():  # an optimizer step that bypasses torch's hooks
        dict(model.named_parameters())[name].add_(1.0)
    assert callback.handle.changed() == [name]
    callback.on_optimizer_step(None, None, None, optimizer=opt)
    assert callback.handle.changed() == []
    callback.on_train_end(None, None, None)


def test_wrapped_model_is_unwrapped(llava_dir, sidecar):
    model = load_model(llava_dir)
    handle = protect(torch.nn.DataParallel(model), sidecar)  # names gain a `module.` prefix
    assert handle.names == sorted(in_memory_masks(sidecar, llava_dir))
    handle.remove()


def test_dowser_merge_after_lora_restores_the_entrywise_mask(llava_dir, sidecar, tmp_path):
    from dowser_tool import Sidecar
    from dowser_tool.repair.merge import merge_checkpoint

    model = lora_model(llava_dir)
    handle = protect(model, sidecar)
    opt, sched = adamw_with_schedule(model.parameters())
    train(model, opt, sched, batches(96))
    handle.remove()
    model.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(str(llava_dir), str(tmp_path / "adapter"), str(sidecar), str(tmp_path / "out"),
                     update_ratio=0.25, progress=False)
    base, out, side = open_checkpoint(llava_dir), open_checkpoint(tmp_path / "out"), Sidecar(sidecar)
    moved = 0
    for name in side.names:
        mask, before, after = side.mask(name), base.read(name), out.read(name)
        assert torch.equal(after[mask], before[mask])
        moved += int((after != before).sum())
    assert moved > 0  # the adapters' trainable entries survive the repair


def test_model_converted_after_protect(llava_dir, sidecar):
    model = load_model(llava_dir)
    handle = protect(model, sidecar)
    model.to(torch.bfloat16)  # same Parameter objects, new data: the saved values follow
    before = snapshot(model)
    opt, sched = adamw_with_schedule(model.parameters())
    train(model, opt, sched, batches(96, 2))
    assert handle.changed() == []
    assert_protected_fixed_and_trainable_moved(model, before, in_memory_masks(sidecar, llava_dir))
    handle.remove()
