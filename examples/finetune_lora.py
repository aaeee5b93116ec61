"""Fine-tune LoRA adapters (PEFT) under a Dowser mask, then merge them.

    pip install 'dowser-tool[peft]'
    python examples/finetune_lora.py --mask tiny-llava.dowser.safetensors [--steps 3]

On a LoRA model `protect` uses the row/column factorised mask: each adapted
weight may change only in its trainable rows x trainable columns. After merging,
the script checks that the merged delta is zero everywhere else.
"""

from __future__ import annotations

from finetune_with_mask import load_example, mask_path, parse_args, report, task_batch, train_loop


def main():
    from peft import LoraConfig, get_peft_model
    from dowser_tool import protect

    args = parse_args(__doc__.splitlines()[0], default_lr=1e-2)
    model, tokenizer = load_example(args.model)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    handle = protect(model, mask_path(args), update_ratio=args.update_ratio)
    adapters = [p for p in model.parameters() if p.requires_grad]
    losses = train_loop(model, adapters, task_batch(tokenizer), args.steps, args.lr)
    report(handle, losses[0], losses[-1])
    handle.remove()

    merged = model.merge_and_unload()
    weights = dict(merged.named_parameters())
    for module_name, axes in handle.lora.items():
        name = module_name.removeprefix("base_model.model.") + ".weight"
        delta = weights[name].detach() - base[f"{module_name}.base_layer.weight"]
        outside = ~axes.submatrix()
        if delta[outside].any():
            raise SystemExit(f"{name}: the merged delta is nonzero outside the trainable rows x columns")
    print(f"merged {len(handle.lora)} adapted weights: deltas confined to trainable rows x columns")
    if args.out:
        merged.save_pretrained(args.out)
        print("saved", args.out)


if __name__ == "__main__":
    main()
