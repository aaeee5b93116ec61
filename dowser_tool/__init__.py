"""dowser-tool: data-free Model-Dowser masks that protect what a pretrained model knows.

Public API (see README): `load_mask`, `protect`, `open_checkpoint`, `Sidecar`.
"""

__version__ = "0.1.0"

from .errors import DowserError  # noqa: E402
from .checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from .sidecar import Sidecar, load_mask  # noqa: E402

__all__ = ["__version__", "DowserError", "Checkpoint", "open_checkpoint", "Sidecar", "load_mask", "protect", "ProtectHandle"]


def __getattr__(name):
    # The training integration imports optimizer machinery; load it only when asked for.
    if name in ("protect", "ProtectHandle"):
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'dowser_tool' has no attribute {name!r}")
