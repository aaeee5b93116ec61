"""The `dowser` command: a thin click layer over the library (nothing else imports click)."""

from __future__ import annotations

import functools
import os
import signal
import sys

import click

from .. import __version__
from ..compat import check_versions
from ..errors import DowserError
from ..io.outputs import sigterm_as_interrupt


# transformers' own warnings (config checks, loading notes) would surround our one-line errors;
# a user who wants them sets TRANSFORMERS_VERBOSITY (read when transformers is imported).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def user_errors(fn):
    """DowserError -> one line on stderr, exit 1; Ctrl-C/SIGTERM -> exit 130. No tracebacks.

    SIGTERM is turned into KeyboardInterrupt so that every `finally` runs and
    temporary files and folders are removed, as for Ctrl-C.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            signal.signal(signal.SIGTERM, sigterm_as_interrupt)
        except ValueError:  # not in the main thread (e.g. embedded): leave signals alone
            pass
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
    check_versions()  # after --help/--version (they exit first): one line if transformers/peft are untested


def _register() -> None:
    # One module per subcommand; each holds only argument parsing and calls into the library.
    from .inspect_cmd import inspect
    from .interchange_cmd import export_scores, import_scores
    from .merge_cmd import merge
    from .probe_cmd import mask, probe
    from .adapter_cmd import sparse_adapter_cmd

    for command in (probe, mask, merge, inspect, import_scores, export_scores, sparse_adapter_cmd):
        main.add_command(command)


_register()
