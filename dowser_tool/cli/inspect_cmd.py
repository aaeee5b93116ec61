"""`dowser inspect`."""

import click

from . import user_errors


@click.command()
@click.argument("sidecar", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), help="Save a PNG of protected fraction by layer.")
@user_errors
def inspect(sidecar, as_json, plot_png):
    """Show provenance and per-tensor protected fractions of a sidecar."""
    from ..inspection import format_json, format_text, plot, summarize

    summary = summarize(sidecar)
    click.echo(format_json(summary) if as_json else format_text(summary))
    if plot_png:
        plot(summary, plot_png)
