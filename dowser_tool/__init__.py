"""dowser-tool: data-free Model-Dowser masks that protect what a pretrained model knows.

Public API (see README): `load_mask`, `protect`, `open_checkpoint`, `Sidecar`; the probe is
`dowser_tool.probe.probe`, the merge `dowser_tool.repair.merge_checkpoint`, the Trainer callback
`DowserCallback` (also `dowser_tool.train.callback.DowserCallback`).

Nothing heavy is imported here: torch and transformers load when a name that needs them is
first used, so `dowser --help` starts at once.
"""

__version__ = "0.1.0"

from .errors import DowserError  # noqa: E402
from . import _moved  # noqa: E402,F401  (old module paths, deprecated)

__all__ = ["__version__", "DowserError", "Checkpoint", "open_checkpoint", "Sidecar", "load_mask", "protect", "ProtectHandle", "DowserCallback",
           "sparse_adapter"]

_LAZY = {
    "Checkpoint": "io.checkpoint", "open_checkpoint": "io.checkpoint",
    "Sidecar": "sidecar.file", "load_mask": "sidecar.file",
    "protect": "train.protect", "ProtectHandle": "train.protect",
    "DowserCallback": "train.callback", "sparse_adapter": "train.sparse",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dowser_tool' has no attribute {name!r}")
