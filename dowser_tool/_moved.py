"""Old module paths (before the sub-packages of 0.2), kept for one release with a warning.

`import dowser_tool.merge` still works and gives `dowser_tool.repair.merge` itself, with a
`DeprecationWarning` naming the new path. Remove in 0.3.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "checkpoint": "io.checkpoint", "safetensors_format": "io.layout", "outputs": "io.outputs",
    "anatomy": "model.anatomy", "streaming": "model.streaming", "scoring": "score",
    "probes": "probe.prompts", "statistics": "probe.statistics", "merge": "repair.merge",
    "merge_kernels": "repair.kernels", "lora_merge": "repair.lora", "training": "train.protect",
    "integrations": "train.callback", "card": "interop.card", "interchange": "interop.released",
    "inspection": "sidecar.summary",
}
_PKG = __name__.rsplit(".", 1)[0]


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `dowser_tool.<old>` with the module now at `dowser_tool.<new>`."""

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, leaf = fullname.rpartition(".")
        if pkg == _PKG and leaf in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{_PKG}.{MOVED[spec.name.rpartition('.')[2]]}"
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in dowser-tool 0.3",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())


def moved_attribute(package: str, new_module, name: str):
    """Attribute `name` of `new_module`, asked for at its old path `package.name` (a package that was
    one module before 0.2), with a DeprecationWarning naming the new path; AttributeError otherwise.
    For a package's module-level `__getattr__`."""
    if hasattr(new_module, name) and not name.startswith("__"):
        warnings.warn(f"{package}.{name} moved to {new_module.__name__}.{name}; the old path goes in "
                      "dowser-tool 0.3", DeprecationWarning, stacklevel=3)
        return getattr(new_module, name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
