"""The `dowser` command: a thin click layer over the library (nothing else imports click)."""

from __future__ import annotations

import functools
import sys

import click

from . import __version__
from .errors import DowserError


def _user_errors(fn):
    """DowserError -> one line on stderr, exit 1; Ctrl-C/SIGTERM -> exit 130. No tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DowserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: no output written", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dowser")
def main():
    """Data-free Model-Dowser masks: find the weights that carry what a pretrained model knows."""


@main.command()
@click.argument("sidecar", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), help="Save a PNG of protected fraction by layer.")
@_user_errors
def inspect(sidecar, as_json, plot_png):
    """Show provenance and per-tensor protected fractions of a sidecar."""
    from .inspection import format_json, format_text, plot, summarize

    summary = summarize(sidecar)
    click.echo(format_json(summary) if as_json else format_text(summary))
    if plot_png:
        plot(summary, plot_png)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_user_errors
def probe(args):
    """Stream a checkpoint and write its NAME.dowser.safetensors mask (not implemented yet)."""
    raise DowserError("dowser probe: not implemented yet")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_user_errors
def merge(args):
    """Repair a fine-tuned checkpoint from its base with a mask (not implemented yet)."""
    raise DowserError("dowser merge: not implemented yet")


if __name__ == "__main__":
    main()
