"""`dowser import-scores` and `dowser export-scores`: the released Model-Dowser scripts' score files."""

import click

from . import user_errors


@click.command("import-scores")
@click.argument("folder")
@click.option("--base", help="The model the scores were computed on (folder or Hub id).  [required]")
@click.option("--base-revision", help="Branch, tag or commit of a Hub BASE.")
@click.option("--out", help="Output sidecar (*.dowser.safetensors).  [required]")
@click.option("--update-ratio", type=float, default=0.1, show_default=True,
              help="Trainable fraction of each matrix for the stored masks (re-cut any time from the kept scores).")
@click.option("--allow-pickle", is_flag=True, help="Read a BASE stored as *.bin pickles (weights_only=True).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@user_errors
def import_scores(folder, base, base_revision, out, update_ratio, allow_pickle, force):
    """Make a sidecar from the released Model-Dowser scripts' per-module score files (FOLDER/*.pt)."""
    from ..errors import DowserError
    from ..interop.released import import_scores as run

    missing = [option for option, value in {"--base": base, "--out": out}.items() if not value]
    if missing:
        raise DowserError(f"missing {', '.join(missing)} (see dowser import-scores --help)")
    s = run(folder, base, out, update_ratio=update_ratio, base_revision=base_revision, allow_pickle=allow_pickle,
            force=force)
    click.echo(f"wrote {s['path']}: {s['tensors']} tensors, {s['weights']:,} weights, "
               f"{s['protected_fraction']:.4f} protected, scores kept for re-cutting")


@click.command("export-scores")
@click.argument("sidecar")
@click.option("--revision", help="Branch, tag or commit of a Hub sidecar (REPO_ID or REPO_ID/FILE).")
@click.option("--base", help="Base model (folder or Hub id) [default: the one the sidecar records].")
@click.option("--base-revision", help="Branch, tag or commit of a Hub BASE.")
@click.option("--out", help="Output folder of per-module .pt files.  [required]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the saved score matrices (the scripts' default is bfloat16).")
@click.option("--allow-pickle", is_flag=True, help="Read a BASE stored as *.bin pickles (weights_only=True).")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@user_errors
def export_scores(sidecar, revision, base, base_revision, out, dtype, allow_pickle, force):
    """Write a sidecar's scores as the released Model-Dowser scripts' per-module .pt files."""
    from ..errors import DowserError
    from ..interop.released import export_scores as run

    if not out:
        raise DowserError("missing --out (see dowser export-scores --help)")
    s = run(sidecar, out, base=base, base_revision=base_revision, revision=revision, dtype=dtype,
            allow_pickle=allow_pickle, force=force)
    click.echo(f"wrote {s['path']}: {s['files']} score files")
