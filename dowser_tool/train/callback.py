"""Hugging Face Trainer integration: `DowserCallback` (docs/TRAINING.md)."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..errors import DowserError
from ..sidecar.file import Sidecar, resolve_sidecar
from .protect import ProtectHandle, protect

logger = logging.getLogger("dowser_tool.integrations")  # the 0.1 name: users' logging config still applies


class DowserCallback(TrainerCallback):
    """Keep a sidecar's protected weights fixed during `Trainer.train()` (and TRL trainers,
    which subclass Trainer).

    on_train_begin: the Trainer has built and prepared its optimizer by then (transformers
    creates it in `_prepare_for_training`, before this event, and passes it in), so
    `protect` watches exactly that optimizer and zeroes any state it already holds (resumed
    runs). on_optimizer_step: the optimizer's own post-step hook has normally enforced the
    mask already; if it did not fire (an optimizer whose step bypasses torch's hooks), the
    mask is enforced here. on_train_end: the hooks are removed.

    mask_path: a sidecar file, a Hub reference `REPO_ID` / `REPO_ID/FILE` (at `revision`),
    a `Sidecar` or a dict of masks (as `protect` takes). A Hub sidecar is resolved (downloaded
    into the HF cache, `sidecar.resolve_sidecar`) here, so a bad reference fails before the
    Trainer starts. update_ratio: re-cut the masks at this ratio (see `protect`).
    """

    def __init__(self, mask_path, update_ratio: float | None = None, *, revision: str | None = None):
        if not isinstance(mask_path, (dict, Sidecar)):
            mask_path = resolve_sidecar(mask_path, revision)
        elif revision is not None:
            raise DowserError("revision= applies to a sidecar path or Hub reference, not to a Sidecar or dict")
        self.mask_path = mask_path
        self.update_ratio = update_ratio
        self.handle: ProtectHandle | None = None
        self._steps_seen = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.handle is not None:
            self.handle.remove()
        # With no optimizer passed (older transformers), every optimizer is watched instead.
        self.handle = protect(model, self.mask_path, update_ratio=self.update_ratio, optimizer=optimizer)
        self._steps_seen = self.handle.steps
        total = self.handle.trainable + self.handle.protected
        logger.info(
            "dowser: %d weights covered, %d of %d entries trainable (%.2f%%)",
            len(self.handle.names), self.handle.trainable, total, 100.0 * self.handle.trainable / max(total, 1),
        )

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.handle is None:
            return
        if self.handle.steps == self._steps_seen:  # the post-step hook did not run for this step
            self.handle.enforce(optimizer)
        self._steps_seen = self.handle.steps

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
