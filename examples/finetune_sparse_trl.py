"""Fine-tune the mask's trainable entries as a PEFT sparse adapter with TRL's SFTTrainer.

    pip install 'dowser-tool[trl]'
    python examples/finetune_sparse_trl.py --mask tiny-llava.dowser.safetensors [--steps 3] [--out DIR]

The PEFT model from `sparse_adapter` is passed to SFTTrainer as it is (no peft_config, no
callback); the adapter is saved, reloaded, merged and checked as in finetune_sparse_adapter.py.
"""

from __future__ import annotations

from finetune_sparse_adapter import build, finish, settings
from finetune_with_mask import TASK, parse_args


def main():
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = parse_args(__doc__.splitlines()[0], default_lr=1e-2)
    adapter, tokenizer, _ = build(args)
    config = SFTConfig(**settings(args, "dowser-sparse-trl-"), dataset_text_field="text", max_length=32)
    trainer = SFTTrainer(model=adapter, args=config, train_dataset=Dataset.from_dict({"text": TASK}),
                         processing_class=tokenizer)
    finish(trainer, adapter, args)


if __name__ == "__main__":
    main()
