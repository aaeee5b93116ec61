"""The option tables in docs/*.md, generated from the commands themselves (one source of help).

A page marks a table with `<!-- options: COMMAND -->` ... `<!-- /options -->`; between the
markers goes exactly what `options_table(COMMAND)` renders from the click command's own
options, defaults and help, the same text `dowser COMMAND --help` prints.

    python -m dowser_tool.cli.docs [--check] [PAGES...]   (default: every docs/*.md)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from . import main

_BLOCK = re.compile(r"(<!-- options: (?P<cmd>[\w-]+) -->\n)(?P<body>.*?)(<!-- /options -->)", re.S)


def options_table(command: str) -> str:
    """A markdown table of a `dowser` command's arguments and options: flags, default, help."""
    cmd = main.commands[command]
    ctx = click.Context(cmd, info_name=command)
    usage = " ".join(["dowser", command] + [a.human_readable_name for a in cmd.params if isinstance(a, click.Argument)])
    rows = [f"`{usage}`: {_cell((cmd.help or '').strip().split(chr(10) + chr(10))[0])}", "",
            "| option | default | meaning |", "|---|---|---|"]
    for param in cmd.get_params(ctx):
        record = None if isinstance(param, click.Argument) else param.get_help_record(ctx)
        if record is None or "--help" in param.opts:
            continue
        flags, help_text = record
        default, help_text = _bracket(help_text, "default")
        required, help_text = _bracket(help_text, "required")
        if required is not None:
            default = "required" + (required and f" {required.lstrip(', ')}")
        rows.append(f"| `{flags}` | {_cell(default or '')} | {_cell(help_text)} |")
    return "\n".join(rows) + "\n"


def _bracket(text: str, word: str) -> tuple[str | None, str]:
    """('X', text without it) for a `[word: X]` (or `[word...]`) note in click help text."""
    m = re.search(r"\s*\[" + word + r":?\s*([^\]]*)\]", text)
    if m is None:
        return None, text
    return m.group(1).strip(), (text[: m.start()] + text[m.end():]).strip()


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def sync(page: Path, check: bool = False) -> bool:
    """Rewrite (or with `check`, compare) every option table of one page; True if it was up to date."""
    text = page.read_text()
    new = _BLOCK.sub(lambda m: m.group(1) + options_table(m.group("cmd")) + m.group(4), text)
    if new != text and not check:
        page.write_text(new)
    return new == text


def _main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    pages = [Path(a) for a in args if a != "--check"] or sorted((Path(__file__).parents[2] / "docs").glob("*.md"))
    stale = [str(p) for p in pages if not sync(p, check)]
    if stale and check:
        print("out of date (run python -m dowser_tool.cli.docs): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
