"""The one exception type users see.

Library code raises `DowserError` for anything the user can fix (a bad path, a
corrupt file, a mismatched mask). The CLI prints its message on one line and
exits non-zero; anything else is a bug and keeps its traceback.
"""


class DowserError(Exception):
    """A user-facing error: one line, naming the file or input and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def reason(e: BaseException, sentence: bool = False) -> str:
    """Another library's exception as a short reason for a one-line error: its class name and the
    first line of its message (with `sentence`, only that line's first sentence, for messages that
    go on to give advice). Never cut mid-word."""
    line = (str(e).strip().splitlines() or [""])[0]
    if sentence:
        line = line.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
