"""Fine-tune with a Dowser mask in a plain PyTorch loop.

    python examples/finetune_with_mask.py --mask tiny-llava.dowser.safetensors [--steps 3]

Without --mask the example probes the model first (about 15 s on CPU for the
tiny example model). `protect` keeps every protected weight bit-identical: the
script checks that at the end. The other two examples reuse the helpers here.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# A made-up downstream task: the sentences the tiny model should learn to continue.
TASK = [
    "answer: the circle is red and the square is blue",
    "answer: there are three triangles in the picture",
    "answer: the letters reversed are c b a",
    "answer: the fox jumps over the dog",
]


def parse_args(description: str, default_lr: float = 1e-3) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", help="model folder (default: the model --mask was probed on, if it is a local "
                                        "folder, else examples/tiny-llava)")
    parser.add_argument("--mask", help="sidecar from `dowser probe`; probed here if omitted")
    parser.add_argument("--update-ratio", type=float, help="re-cut the mask at this ratio from its statistics")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (use 3 for a smoke run)")
    parser.add_argument("--lr", type=float, default=default_lr)
    parser.add_argument("--out", help="save the fine-tuned model here")
    args = parser.parse_args()
    if args.model is None:
        args.model = probed_model(args.mask) or str(HERE / "tiny-llava")
        print(f"model: {args.model}")
    return args


def probed_model(mask: str | None) -> str | None:
    """The local folder a sidecar was probed on, as its metadata records it (None if not local)."""
    if mask is None:
        return None
    from dowser_tool import Sidecar

    recorded = (Sidecar(mask).metadata.get("base_model") or {}).get("id")
    return recorded if recorded and Path(recorded).is_dir() else None


def scratch_dir(prefix: str) -> str:
    """A temporary folder removed when the example exits."""
    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def mask_path(args) -> str:
    """The sidecar to use: --mask, or a quick probe of the model written to --out (or a temp folder)."""
    if args.mask:
        return args.mask
    from dowser_tool.probe.run import ProbeSettings, probe

    folder = Path(args.out or scratch_dir("dowser-example-"))
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / (Path(args.model).name + ".dowser.safetensors")
    print(f"probing {args.model} (no --mask given) -> {dest}")
    probe(args.model, str(dest), settings=ProbeSettings(probes=8, probe_len=16, draws=2), force=True, progress=False)
    return str(dest)


def load_example(model_dir: str):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    return model.train(), AutoTokenizer.from_pretrained(model_dir)


def task_batch(tokenizer) -> dict:
    """The whole task as one causal-LM batch: labels are the inputs, padding ignored (-100)."""
    enc = tokenizer(TASK, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def task_examples(tokenizer) -> list[dict]:
    """The task as a dataset of single examples (for the Trainer)."""
    batch = task_batch(tokenizer)
    return [{k: v[i] for k, v in batch.items()} for i in range(len(TASK))]


def train_loop(model, parameters, batch: dict, steps: int, lr: float) -> list[float]:
    """AdamW with warmup and cosine decay; returns the loss of every step."""
    from transformers import get_cosine_schedule_with_warmup

    # Weight decay on purpose: protect() keeps protected weights fixed even so.
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def report(handle, first_loss: float, last_loss: float) -> None:
    total = handle.trainable + handle.protected
    print(f"loss {first_loss:.3f} -> {last_loss:.3f}; {len(handle.names)} weights, "
          f"{handle.trainable}/{total} entries trainable")
    changed = handle.changed()
    print("protected entries unchanged:", not changed)
    if changed:
        raise SystemExit(f"protected entries moved in {changed}")


def trainer_settings(args, prefix: str) -> dict:
    """Settings shared by the Trainer-based examples (transformers' TrainingArguments, TRL's SFTConfig)."""
    return dict(
        output_dir=args.out or scratch_dir(prefix),
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


def train_and_report(trainer, callback, args) -> None:
    """Run a Trainer that holds a DowserCallback, check the protected entries, save to --out."""
    result = trainer.train()
    print(f"trained {result.global_step} steps with {type(trainer).__name__}")
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    report(callback.handle, losses[0], result.training_loss if len(losses) < 2 else losses[-1])
    if args.out:
        trainer.save_model(args.out)
        print("saved", args.out)


def main():
    from dowser_tool import protect

    args = parse_args(__doc__.splitlines()[0])
    model, tokenizer = load_example(args.model)
    handle = protect(model, mask_path(args), update_ratio=args.update_ratio)
    losses = train_loop(model, list(model.parameters()), task_batch(tokenizer), args.steps, args.lr)
    report(handle, losses[0], losses[-1])
    handle.remove()
    if args.out:
        model.save_pretrained(args.out)
        print("saved", args.out)


if __name__ == "__main__":
    main()
