"""How results are cut and written: each scored weight's mask cut from its score (from the loaded
weight when it is exact, else read again), spilled bit-packed to disk until the sidecar is
written; the statistics of several torchrun ranks gathered into one table; and the `info`
the sidecar records about the run (docs/FORMAT.md).

Owns: `MaskCutter`, `gather`, `probe_info`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io.checkpoint import Checkpoint
from ..model.anatomy import Weight
from ..model.streaming import trim_heap
from ..score import cut_mask, score_matrix
from ..sidecar.file import MaskSpill, PackedMask, weight_fingerprint
from .selection import WeightSelection
from .settings import ProbeSettings
from .statistics import StatsRecorder


class MaskCutter:
    """Masks of one probe, bit-packed into a nameless MaskSpill file in `spill_dir` (None: the system's
    temporary folder) until the sidecar is written.

    `cut_early[key]`: masks cut during the last pass, while their layer was loaded;
    `fingerprints[key]`: weight_fingerprint of each whole scored tensor, as stored.
    """

    def __init__(self, ckpt: Checkpoint, runner, settings: ProbeSettings, spill_dir=None):
        self.ckpt, self.runner, self.s = ckpt, runner, settings
        self.cut_early: dict = {}  # masks cut in the last pass, by checkpoint key
        self.fingerprints: dict[str, str] = {}  # weight_fingerprint of each scored tensor, by checkpoint key
        self.mask_spill = MaskSpill(spill_dir)  # packed masks on disk until the sidecar is written

    def loaded_weight(self, w: Weight) -> torch.Tensor | None:
        """The checkpoint tensor of `w`, bit for bit, from the parameter loaded now; None if it is not
        loaded or the compute dtype cannot hold the stored values exactly (e.g. float32 stored,
        bfloat16 computed): it is then read again from the checkpoint."""
        p = self.runner.model.get_parameter(w.param)
        stored = self.ckpt.dtype(w.key)
        if p.device.type == "meta" or not _holds_exactly(p.dtype, stored):
            return None
        if w.expert is None and w.param in self.runner.anatomy.keys.converter:
            return None  # loaded through a converter (a transposed expert stack): not the stored layout
        t = p.detach()
        if w.expert is not None:
            t = t[w.expert, w.rows[0]:w.rows[1]]
        return t.to("cpu", stored)

    def cut_loaded(self, weights: list[Weight], rec: StatsRecorder, update_weights: list[float]) -> None:
        """Cut the masks of weights whose statistics are complete, from their loaded values."""
        for x in weights:
            W = self.loaded_weight(x)
            if W is not None:
                psi, a = torch.stack(rec.psi[x.key]), torch.stack(rec.a[x.key])
                self.cut_early[x.key] = self.cut(x, W, psi, a, torch.tensor(update_weights))

    def cut(self, x: Weight, W: torch.Tensor, psi, a, w):
        """x's mask, cut from its weight (as stored) and statistics, bit-packed into the spill file."""
        self.fingerprints[x.key] = weight_fingerprint(W)  # the tensor as stored (one expert's, too): merge checks BASE
        score = score_matrix(W, psi, a, w, transposed=x.transposed)
        mask = self.mask_spill.add(PackedMask.of(cut_mask(score, self.s.update_ratio)))
        del score
        trim_heap()
        return mask

    def cut_all(self, weights: list[Weight], psi: dict, a: dict, w, progress: bool) -> dict:
        """Every weight's mask, by checkpoint key: those cut early as they are; `random` from seeded
        uniform scores; the others from their statistics (psi[key] (U, out), a[key] (U, in), update
        weights w (U,)) and the weight, from the loaded parameter if exact, else read again."""
        s, masks = self.s, {}
        for idx, x in enumerate(tqdm(weights, desc="cutting masks", disable=not progress, leave=False)):
            if x.key in self.cut_early:  # cut while the layer was loaded in the last pass
                masks[x.key] = self.cut_early[x.key]
                continue
            if s.method == "random":
                gen = torch.Generator().manual_seed(s.seed * 1_000_003 + idx)
                masks[x.key] = self.mask_spill.add(PackedMask.of(cut_mask(torch.rand(self.ckpt.shape(x.key), generator=gen),
                                                                     s.update_ratio)))
                continue
            W = self.loaded_weight(x)  # the stem (lm_head, vision, projector) stays loaded
            W = self.runner.read_raw([x.key])[x.key] if W is None else W
            masks[x.key] = self.cut(x, W, psi[x.key], a[x.key], w)
            del W
        return masks


def gather(rec: StatsRecorder, batches, weights: list[Weight], sizes: dict, rank: int, world: int) -> None:
    """Each rank holds its own batches' updates; sum zero-padded (U, n) tables across ranks
    (adding zeros is exact) and keep every update in batch order, as one process would."""
    import torch.distributed as dist

    mine = [b for b, _ in batches if b % world == rank]
    for w in weights:
        out_f, in_f = sizes[w.key]
        for table, width in ((rec.psi, out_f), (rec.a, in_f)):
            rows = table.get(w.key, [])
            full = torch.zeros(len(batches), width)
            for b, row in zip(mine, rows):
                full[b] = row
            dist.all_reduce(full)
            table[w.key] = list(full)


def probe_info(ckpt: Checkpoint, s: ProbeSettings, selection: WeightSelection, fingerprints: dict,
               tokens: torch.Tensor | None, dtype: torch.dtype) -> dict:
    """The sidecar's `info` (docs/FORMAT.md): the base model, the settings, what was scored and what not."""
    source = s.probe_file or ("self-generated" if s.method in ("dowser", "wanda") else "none")
    base_id = str(Path(ckpt.source).resolve()) if not ckpt.is_remote and ckpt.sha is None else ckpt.source
    return {
        "base_model": {"id": base_id, "revision": ckpt.revision, "sha": ckpt.sha},
        "architecture": (ckpt.config or {}).get("model_type"),
        "method": s.method,
        "estimator": s.estimator if s.method == "dowser" else None,
        "update_ratio": s.update_ratio,
        "granularity": "entry",
        "layers": selection.layers,
        "include": sorted(s.include),
        "tensor_info": {x.key: _tensor_info(x, fingerprints.get(x.key)) for x in selection.weights},
        "unscored": dict(sorted(selection.unscored.items())),
        "probe": {
            "count": None if tokens is None else int(tokens.shape[0]),
            "length": None if tokens is None else int(tokens.shape[1]),
            "batch_size": s.batch_size,
            "draws": s.draws if s.method == "dowser" else 0,
            "seed": s.seed,
            "images": s.images,
            "source": source,
            "sampling": asdict(s.sampling),
            "compute_dtype": str(dtype).replace("torch.", ""),
        },
    }


def _holds_exactly(compute: torch.dtype, stored: torch.dtype) -> bool:
    """Whether converting `stored` values to `compute` and back gives the same bits."""
    if compute == stored:
        return True
    wider = {torch.float32: (torch.bfloat16, torch.float16), torch.float64: (torch.float32, torch.bfloat16, torch.float16)}
    return stored in wider.get(compute, ())


def _tensor_info(w: Weight, fingerprint: str | None) -> dict:
    """What the sidecar records about one scored tensor (docs/FORMAT.md, `tensor_info`)."""
    info = {"part": w.part, "kind": w.kind, "layer": w.layer, "layout": "in_out" if w.transposed else "out_in"}
    if w.expert is not None:
        info["expert"] = w.expert
    if fingerprint is not None:
        info["fingerprint"] = fingerprint
    return info
