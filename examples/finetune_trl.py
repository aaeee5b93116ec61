"""Fine-tune with a Dowser mask through TRL's SFTTrainer (DowserCallback).

    pip install 'dowser-tool[trl]'
    python examples/finetune_trl.py --mask tiny-llava.dowser.safetensors [--steps 3]

SFTTrainer subclasses the Hugging Face Trainer, so it takes the callback as the Trainer
does: the callback protects the model when training begins (on the optimizer TRL built)
and enforces the mask after every optimizer step. --mask may be a local file or a Hub
reference (ORG/NAME or ORG/NAME/FILE); without it the example probes the model first.
"""

from __future__ import annotations

from finetune_with_mask import TASK, load_example, mask_path, parse_args, train_and_report, trainer_settings


def main():
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from dowser_tool.train.callback import DowserCallback

    args = parse_args(__doc__.splitlines()[0])
    model, tokenizer = load_example(args.model)
    callback = DowserCallback(mask_path(args), update_ratio=args.update_ratio)
    # SFTTrainer tokenizes the text column itself (and appends EOS); the Trainer settings are the same
    config = SFTConfig(**trainer_settings(args, "dowser-trl-"), dataset_text_field="text", max_length=32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": TASK}),
                         processing_class=tokenizer, callbacks=[callback])
    train_and_report(trainer, callback, args)


if __name__ == "__main__":
    main()
