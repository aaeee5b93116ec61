"""`dowser sparse-adapter`."""

import click

from . import user_errors


@click.command("sparse-adapter")
@click.argument("base")
@click.argument("sidecar")
@click.option("--out", help="Adapter folder to write.  [required]")
@click.option("--update-ratio", type=float, help="Re-cut every mask at this ratio from the sidecar's statistics.")
@click.option("--revision", help="Branch, tag or commit of a Hub BASE.")
@click.option("--sidecar-revision", help="Branch, tag or commit of a Hub SIDECAR.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@user_errors
def sparse_adapter_cmd(base, sidecar, out, update_ratio, revision, sidecar_revision, force):
    """Write an untrained PEFT sparse adapter (peft Super-Tuning) on BASE whose trainable entries are
    exactly SIDECAR's; train it with any trainer that loads a PEFT adapter (docs/TRAINING.md)."""
    from ..errors import DowserError
    from ..train.sparse import write_untrained_adapter

    if not out:
        raise DowserError("missing --out (see dowser sparse-adapter --help)")
    record = write_untrained_adapter(base, sidecar, out, update_ratio=update_ratio, revision=revision,
                                     sidecar_revision=sidecar_revision, force=force)
    padding = sum(record["padding"].values())
    click.echo(f"wrote {out}: {len(record['modules'])} matrices, {record['trainable']} trainable entries"
               + (f" ({padding} padding slots)" if padding else "")
               + (f"; {len(record['uncovered'])} masked tensors not covered" if record["uncovered"] else ""))
