"""The mask sidecar, `NAME.dowser.safetensors` (docs/FORMAT.md): the probe's output, every later
stage's input.

Owns: writing and reading the file, re-cutting masks from its statistics (`file`), its checked
header (`header`, torch-free), finding it locally or on the Hub (`resolve`, torch-free), and the
summary `dowser inspect` prints (`summary`, torch-free).

May import: `dowser_tool.score`, `dowser_tool.model`, `dowser_tool.io`, `dowser_tool.errors`.
"""

__all__ = ["Sidecar", "SidecarData", "load_mask", "resolve_sidecar", "write_sidecar"]


def __getattr__(name):
    # Lazy, so that `dowser_tool.sidecar.summary` (`dowser inspect`) loads without torch, which `file`
    # imports. `dowser_tool.sidecar` was one module before 0.2; every name of it is still reachable here.
    if name == "resolve_sidecar":
        from .resolve import resolve_sidecar

        return resolve_sidecar
    from . import file

    if hasattr(file, name) and not name.startswith("__"):
        return getattr(file, name)
    raise AttributeError(f"module 'dowser_tool.sidecar' has no attribute {name!r}")
