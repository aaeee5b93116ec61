"""Fine-tune with a Dowser mask through the Hugging Face Trainer (DowserCallback).

    python examples/finetune_hf_trainer.py --mask tiny-llava.dowser.safetensors [--steps 3]

The callback protects the model when training begins and enforces the mask after
every optimizer step; TRL trainers (SFTTrainer, ...) take it the same way.
"""

from __future__ import annotations


from finetune_with_mask import load_example, mask_path, parse_args, task_examples, train_and_report, trainer_settings


def main():
    from transformers import Trainer, TrainingArguments

    from dowser_tool.train.callback import DowserCallback

    args = parse_args(__doc__.splitlines()[0])
    model, tokenizer = load_example(args.model)
    callback = DowserCallback(mask_path(args), update_ratio=args.update_ratio)
    training_args = TrainingArguments(**trainer_settings(args, "dowser-trainer-"))
    trainer = Trainer(model=model, args=training_args, train_dataset=task_examples(tokenizer), callbacks=[callback])
    train_and_report(trainer, callback, args)


if __name__ == "__main__":
    main()
