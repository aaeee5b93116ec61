"""Fine-tune with a Dowser mask through the Hugging Face Trainer (DowserCallback).

    python examples/finetune_hf_trainer.py --mask tiny-llava.dowser.safetensors [--steps 3]

The callback protects the model when training begins and enforces the mask after
every optimizer step; TRL trainers (SFTTrainer, ...) take it the same way.
"""

from __future__ import annotations


from finetune_with_mask import load_example, mask_path, parse_args, report, scratch_dir, task_examples


def main():
    from transformers import Trainer, TrainingArguments

    from dowser_tool.integrations import DowserCallback

    args = parse_args(__doc__.splitlines()[0])
    model, tokenizer = load_example(args.model)
    callback = DowserCallback(mask_path(args), update_ratio=args.update_ratio)
    training_args = TrainingArguments(
        output_dir=args.out or scratch_dir("dowser-trainer-"),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=args.lr,
        weight_decay=0.1,  # on purpose: the callback keeps protected weights fixed even so
        warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="cosine",
        logging_steps=max(1, args.steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=task_examples(tokenizer), callbacks=[callback])
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    report(callback.handle, losses[0], result.training_loss if len(losses) < 2 else losses[-1])
    if args.out:
        trainer.save_model(args.out)
        print("saved", args.out)


if __name__ == "__main__":
    main()
