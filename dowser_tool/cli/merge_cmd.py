"""`dowser merge`."""

import click

from ..errors import DowserError
from . import user_errors


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def merge(args):
    """Repair a fine-tuned checkpoint from its base with a mask (not implemented yet)."""
    raise DowserError("dowser merge: not implemented yet")
