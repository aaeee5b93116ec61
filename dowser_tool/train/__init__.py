"""Training with a mask: protected entries stay exactly fixed in any optimizer.

Owns: `protect` (gradient hooks, post-step restore, optimizer state), the Hugging Face
`Trainer` callback (`callback`), and `sparse_adapter` (`sparse`: the trainable set as a PEFT
Super-Tuning adapter).

May import: `dowser_tool.repair`, `dowser_tool.sidecar`, `dowser_tool.score`, `dowser_tool.model`,
`dowser_tool.io`, `dowser_tool.errors`.
"""

from ..compat import check_versions

check_versions()  # one warning line if transformers/peft lie outside the tested range

from .sparse import sparse_adapter  # noqa: F401
