"""`dowser probe`."""

import click

from ..errors import DowserError
from . import user_errors


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def probe(args):
    """Stream a checkpoint and write its NAME.dowser.safetensors mask (not implemented yet)."""
    raise DowserError("dowser probe: not implemented yet")
