"""The one exception type users see.

Library code raises `DowserError` for anything the user can fix (a bad path, a
corrupt file, a mismatched mask). The CLI prints its message on one line and
exits non-zero; anything else is a bug and keeps its traceback.
"""


class DowserError(Exception):
    """A user-facing error: one line, naming the file or input and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
