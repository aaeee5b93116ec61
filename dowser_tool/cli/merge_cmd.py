"""`dowser merge`."""

import click

from . import user_errors


# Inputs are plain strings checked by the library (and required there), so that every bad input,
# a missing one included, gets the same one-line error.
@click.command()
@click.option("--base", help="Base model the mask was probed on (folder or Hub id).  [required]")
@click.option("--finetuned", help="Fine-tuned model, or a PEFT LoRA or Super-Tuning sparse adapter on BASE (folder or "
              "Hub id).  [required]")
@click.option("--mask", "mask_path", help="Mask sidecar: a file, or a Hub repo REPO_ID (its single *.dowser.safetensors) "
              "or REPO_ID/FILE.  [required, except with --interpolate]")
@click.option("--out", help="Output folder.  [required]")
@click.option("--restore", help="Fraction of each masked matrix restored from BASE, highest scores first; "
              "a comma list writes OUT-r<F> per value [default: 0.1].")
@click.option("--update-ratio", help="Same as --restore 1-R.")
@click.option("--interpolate", help="Instead of restoring: BASE + ALPHA (FT - BASE) for every tensor both hold "
              "(WiSE-FT); a comma list writes OUT-a<ALPHA> per value. No mask needed.")
@click.option("--base-revision", help="Branch, tag or commit of a Hub BASE.")
@click.option("--finetuned-revision", help="Branch, tag or commit of a Hub FT.")
@click.option("--mask-revision", help="Branch, tag or commit of a Hub mask.")
@click.option("--shard-size", help="Re-shard the output into files up to this size, e.g. 5GB [default: FT's shards].")
@click.option("--dtype", default="keep", show_default=True,
              help="Output dtype of floating-point tensors: keep, bfloat16, float16 or float32.")
@click.option("--allow-pickle", is_flag=True, help="Load *.bin pickles (weights_only=True).")
@click.option("--force", is_flag=True, help="Overwrite outputs; merge despite a provenance or shape mismatch.")
@click.option("--dry-run", is_flag=True, help="Plan and check the merge, list what each output tensor would be "
              "(restored, copied, ...) and each mask refused, and write nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def merge(base, finetuned, mask_path, out, restore, update_ratio, interpolate, base_revision, finetuned_revision,
          mask_revision,
          shard_size, dtype, allow_pickle, force, dry_run, quiet):
    """Repair a fine-tuned checkpoint: restore the top-scoring weights of each masked matrix from BASE."""
    from ..errors import DowserError
    from ..repair.merge import merge_checkpoint
    from ..probe.run import parse_size

    given = {"--base": base, "--finetuned": finetuned, "--out": out}
    if interpolate is None:
        given["--mask"] = mask_path
    missing = [option for option, value in given.items() if not value]
    if missing:
        raise DowserError(f"missing {', '.join(missing)} (see dowser merge --help)")
    summaries = merge_checkpoint(
        base, finetuned, mask_path, out, restore=restore, update_ratio=update_ratio, interpolate=interpolate,
        base_revision=base_revision,
        finetuned_revision=finetuned_revision, shard_size=parse_size(shard_size) if shard_size else None,
        dtype=dtype, allow_pickle=allow_pickle, force=force, progress=not quiet, mask_revision=mask_revision,
        dry_run=dry_run,
    )
    for summary in summaries:
        click.echo(summary.line())
