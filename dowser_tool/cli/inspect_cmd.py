"""`dowser inspect`."""

import click

from . import user_errors


@click.command()
@click.argument("sidecar", metavar="SIDECAR_OR_ADAPTER_DIR")
@click.option("--revision", help="Branch, tag or commit of a Hub sidecar (REPO_ID or REPO_ID/FILE).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), help="Save a PNG of protected fraction by layer.")
@user_errors
def inspect(sidecar, revision, as_json, plot_png):
    """Show provenance and per-tensor protected fractions of a sidecar (a file, or a Hub REPO_ID or REPO_ID/FILE),
    or which sidecar and base an adapter folder made from one (dowser sparse-adapter) came from."""
    from pathlib import Path

    from ..errors import DowserError
    from ..sidecar.resolve import resolve_sidecar  # torch-free, as is the summary: inspect starts at once
    from ..sidecar.summary import (adapter_folder, format_adapter_text, format_json, format_text, plot, summarize,
                                   summarize_adapter)

    if adapter_folder(Path(sidecar).expanduser()):
        if plot_png:
            raise DowserError(f"{sidecar}: --plot applies to a sidecar, not to an adapter folder")
        summary = summarize_adapter(sidecar)
        click.echo(format_json(summary) if as_json else format_adapter_text(summary))
        return
    summary = summarize(resolve_sidecar(sidecar, revision))
    click.echo(format_json(summary) if as_json else format_text(summary))
    if plot_png:
        plot(summary, plot_png)
        click.echo(f"wrote {plot_png}", err=as_json)  # with --json, stdout stays JSON
