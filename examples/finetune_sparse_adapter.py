"""Fine-tune the mask's trainable entries as a PEFT sparse adapter with the Hugging Face Trainer.

    python examples/finetune_sparse_adapter.py --mask tiny-llava.dowser.safetensors [--steps 3] [--out DIR]

`sparse_adapter(model, mask)` returns an ordinary PEFT model (peft's Super-Tuning tuner) whose
only trainable parameters are the entries the mask leaves trainable: no callback, any trainer
that takes a PEFT model trains it, the optimizer keeps state for those entries only. The
adapter is saved with `save_pretrained` (to --out), loaded back onto a fresh base with
`PeftModel.from_pretrained` and merged with `merge_and_unload()`; the script then checks
that every protected entry of the merged model equals the base's, bit for bit.
finetune_sparse_trl.py does the same with TRL's SFTTrainer.
"""

from __future__ import annotations

import torch
from finetune_with_mask import (
    load_example,
    mask_path,
    parse_args,
    scratch_dir,
    task_examples,
    trainer_settings,
)


def build(args):
    """(the base model wrapped as a sparse adapter, its tokenizer, the sidecar used)."""
    from dowser_tool.train.sparse import sparse_adapter

    model, tokenizer = load_example(args.model)
    mask = mask_path(args)
    adapter = sparse_adapter(model, mask, update_ratio=args.update_ratio)
    record = adapter.dowser_record
    print(f"sparse adapter: {len(record['modules'])} matrices, {record['trainable']} trainable entries "
          f"({sum(record['padding'].values())} padding slots)")
    return adapter, tokenizer, mask


def settings(args, prefix: str) -> dict:
    # no callback and no mask in the trainer: the adapter's parameters are the trainable entries
    return {**trainer_settings(args, prefix), "output_dir": scratch_dir(prefix)}


def finish(trainer, adapter, args) -> None:
    """Train, save the adapter, reload it onto a fresh base, merge, and check the protected entries."""
    from peft import PeftModel

    result = trainer.train()
    print(f"trained {result.global_step} steps with {type(trainer).__name__}")
    folder = args.out or scratch_dir("dowser-sparse-adapter-")
    adapter.save_pretrained(folder)
    print("saved adapter", folder)
    base = load_example(args.model)[0]
    merged = PeftModel.from_pretrained(load_example(args.model)[0], folder).merge_and_unload()
    report(merged, base, adapter)


def report(merged, base, adapter) -> None:
    """Compare the merged model with the base: outside the adapter's indices every entry of every
    parameter must be bit-identical; the indices must be the sidecar's trainable entries."""
    from dowser_tool import Sidecar

    record = adapter.dowser_record
    side = Sidecar(record["sidecar"]["path"])
    same, moved, matches, adapted = True, 0, True, set()
    for module, mask_name in record["modules"].items():  # {module name: sidecar tensor name}
        layer = adapter.get_base_model().get_submodule(module)
        idx = torch.unique(layer.supertuning_indices["default"].long())  # (padding repeats some indices)
        matches &= torch.equal(idx, torch.nonzero(~side.mask(mask_name).reshape(-1)).reshape(-1))
        m, b = merged.get_submodule(module).weight.detach().reshape(-1), base.get_submodule(module).weight.detach().reshape(-1)
        protected = torch.ones(b.numel(), dtype=torch.bool)
        protected[idx] = False
        same &= torch.equal(m[protected].view(torch.int32), b[protected].view(torch.int32))
        moved += int((m[idx] != b[idx]).sum())
        adapted.add(id(merged.get_submodule(module).weight))
    for (name, m), b in zip(merged.named_parameters(), base.parameters()):
        if id(m) not in adapted:  # everything else must not have moved at all
            same &= torch.equal(m.detach().view(torch.int32), b.detach().view(torch.int32))
    print(f"adapter entries are the sidecar's trainable entries: {matches}")
    print(f"{moved}/{record['trainable']} trainable entries moved")
    print("protected entries unchanged:", same)
    if not (same and matches and moved):
        raise SystemExit("the merged model does not keep the mask")


def main():
    from transformers import Trainer, TrainingArguments

    args = parse_args(__doc__.splitlines()[0], default_lr=1e-2)
    adapter, tokenizer, _ = build(args)
    trainer = Trainer(model=adapter, args=TrainingArguments(**settings(args, "dowser-sparse-trainer-")),
                      train_dataset=task_examples(tokenizer))
    finish(trainer, adapter, args)


if __name__ == "__main__":
    main()
