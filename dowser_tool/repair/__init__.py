"""Repairing a fine-tuned checkpoint with a mask, streamed tensor by tensor.

Owns: the merge (`merge`: its entry point; `plan`: what each output tensor is made of and every
check that can refuse; `write`: values, shards, index, files and record), its block kernels
(`kernels`), adapters merged without peft (`lora`), and the post-hoc methods (`methods`:
interpolation, TIES, DARE, Dowser-weighted repairs).

May import: `dowser_tool.sidecar`, `dowser_tool.score`, `dowser_tool.model`, `dowser_tool.io`,
`dowser_tool.errors`.
"""

from ..compat import check_versions

check_versions()  # one warning line if transformers/peft lie outside the tested range

from .merge import merge_checkpoint

__all__ = ["merge_checkpoint"]


def __getattr__(name):
    # `dowser_tool.repair` was the module of post-hoc methods before 0.2 (now `repair.methods`).
    from .. import _moved
    from . import methods

    return _moved.moved_attribute(__name__, methods, name)
