"""`dowser merge`: repair a fine-tuned checkpoint from its base, tensor by tensor.

For every tensor a mask covers, protected entries come from BASE and the others
from the fine-tuned checkpoint (FT); every other tensor is FT's, unchanged. The
output keeps FT's shard layout (BASE's for a LoRA adapter) and is written
header-first, one tensor in memory at a time; shards that need no change are
copied byte for byte, and unchanged tensors inside rewritten shards are copied as
raw bytes, never decoded.

Repair strength: `restore` F protects the fraction F of each scored matrix with the
highest scores, re-cut from the sidecar's statistics and BASE's weights (restoring
the training mask, F = 0.9, undoes most of a fine-tune; docs/METHOD.md, "Post-hoc repair").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..io.checkpoint import (ADAPTER_CONFIG, SAME_SIZE_INT, PICKLE_INDEX, SAFETENSORS_INDEX, Checkpoint, open_checkpoint, same_bits)
from ..errors import DowserError
from .lora import LoraAdapter, is_adapter
from ..model.keys import KeyRules, NameMap
from ..io.outputs import atomic_dir, check_destination
from ..io.layout import DTYPES, TORCH_TO_ST, itemsize
from ..sidecar.file import INPUT_EMBEDDING, OUTPUT_HEAD, Sidecar, resolve_sidecar, weight_fingerprint
from .methods import interpolate as blend
from .kernels import BufferPool, RangeWriter, apply_stored, intra_op_threads, read_tensor, repair_recut
from ..model.streaming import trim_heap

# The forgetting benchmark (benchmarks/forgetting/RESULTS.md, 8 seeds, both models, three depths):
# as one setting nobody tunes, restoring the top 10% did as well as any single setting tried (mean H
# 0.430; the best single interpolation weight 0.415); with evaluation at hand, sweeping --interpolate
# is the better repair. No Dowser-statistics repair beat interpolation, so none is the default.
DEFAULT_RESTORE = 0.1
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
OUTPUT_DTYPES = {"keep": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
REPAIR_RECORD = "dowser_repair.json"
# Non-weight files copied from FT (top level only: repos may hold e.g. original/*.pth).
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".tiktoken", ".py")
_NOT_COPIED = {SAFETENSORS_INDEX, PICKLE_INDEX, ADAPTER_CONFIG, REPAIR_RECORD}
# Tensors prepared ahead of the writer, and threads preparing them: a few tensors in memory at most.
WORKERS, LOOKAHEAD = 2, 2
TRIM_EVERY = 256 << 20  # bytes of decoded tensors written between heap trims (a trim walks the whole heap)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class MergeSummary:
    out: Path
    restore: float | None  # None: the sidecar's own mask was applied (or interpolation)
    tensors_restored: int  # tensors taking entries from BASE (restored or interpolated)
    entries_restored: int
    bytes_written: int
    seconds: float
    shards_copied: int

    alpha: float | None = None  # interpolation weight, when the output is BASE + alpha (FT - BASE)

    def line(self) -> str:
        if self.alpha is not None:
            return (f"wrote {self.out} (interpolate {self.alpha:g}): {self.tensors_restored} tensors interpolated, "
                    f"{self.bytes_written / 1e9:.2f} GB written ({self.shards_copied} shards copied unchanged) "
                    f"in {self.seconds:.1f}s")
        strength = "the sidecar's own mask" if self.restore is None else f"restore {self.restore:g}"
        return (
            f"wrote {self.out} ({strength}): {self.tensors_restored} tensors restored, "
            f"{self.entries_restored:,} entries restored, {self.bytes_written / 1e9:.2f} GB written "
            f"({self.shards_copied} shards copied unchanged) in {self.seconds:.1f}s"
        )


@dataclass
class Item:
    """One output tensor and where its value comes from."""

    name: str  # in the output (= the source checkpoint's name)
    dtype: str  # output safetensors dtype
    shape: tuple[int, ...]
    base_name: str | None = None  # BASE tensor restored into it (when masked)
    mask_names: list[str] = field(default_factory=list)  # sidecar names (several when tied)
    adapted: bool = False  # LoRA: value is BASE's plus the adapter's update
    pair: str | None = None  # BASE's tensor of the same name, shape and a floating dtype (for --interpolate)

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def parse_fractions(text: str | None, what: str) -> list[float] | None:
    """'0.1,0.3' -> [0.1, 0.3]; each in [0, 1]."""
    if text is None or str(text).strip() == "":
        return None
    out = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise DowserError(f"{what} must be a number or a comma list of numbers, got {part.strip()!r}") from None
        if not 0.0 <= value <= 1.0:
            raise DowserError(f"{what} must be in [0, 1], got {value:g}")
        out.append(value)
    return out


def _restore_values(restore, update_ratio) -> list[float] | None:
    if restore is not None and update_ratio is not None:
        raise DowserError("pass --restore or --update-ratio, not both (--update-ratio R means --restore 1-R)")
    if isinstance(restore, str):
        restore = parse_fractions(restore, "--restore")
    if isinstance(update_ratio, str):
        update_ratio = parse_fractions(update_ratio, "--update-ratio")
    values = update_ratio if update_ratio is not None else restore
    if values is None:
        return None
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise DowserError(f"repair strength must be in [0, 1], got {v:g}")
    if update_ratio is not None:
        values = [round(1.0 - v, 10) for v in values]
    if len(set(values)) != len(values):
        raise DowserError("repair strengths repeat a value")
    return values


def _local_sha(ckpt: Checkpoint) -> str | None:
    """A checkpoint's commit: the Hub's, or a HF-cache snapshot folder's name."""
    if ckpt.sha:
        return ckpt.sha
    path = Path(ckpt.source)
    if path.parent.name == "snapshots" and len(path.name) == 40:
        return path.name
    return None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Merge:
    """Inputs opened and checked, and the output planned; `write(dest, restore)` writes one output."""

    def __init__(self, base, finetuned, mask, *, base_revision=None, finetuned_revision=None,
                 shard_size=None, dtype="keep", allow_pickle=False, force=False, progress=True):
        if dtype not in OUTPUT_DTYPES:
            raise DowserError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
        self.out_dtype = OUTPUT_DTYPES[dtype]
        self.shard_size, self.force, self.progress = shard_size, force, progress
        self.sidecar = Sidecar(mask) if mask is not None else None  # None: --interpolate without a mask
        self._alpha: float | None = None
        self.base = open_checkpoint(base, base_revision, allow_pickle=allow_pickle)
        self.ft = open_checkpoint(finetuned, finetuned_revision, allow_pickle=allow_pickle)
        if self.base.config is None:
            raise DowserError(f"{self.base.where}: no config.json (BASE must be a full model)")
        # How this family names its tensors (transformers' loading rules; PEFT folding only for a family
        # transformers does not know, whose names must then match exactly). When BASE and FT hold the
        # same names, the mask covers only those and no mask has a role, the names say everything and
        # the model class (seconds of imports) is not needed: FT, with BASE's config and names, is as
        # consistent as the BASE the mask was probed on.
        plain = (not is_adapter(self.ft) and self.ft.config == self.base.config
                 and set(self.base.tensor_names()) == set(self.ft.tensor_names())
                 and (self.sidecar is None or set(self.sidecar.names) <= set(self.base.tensor_names())
                      and not self.sidecar.roles))
        self.rules = KeyRules(None) if plain else KeyRules.of_config(self.base.config, f"{self.base.where}/config.json")
        self.base_map = NameMap(self.base.tensor_names(), self.rules, self.base.where)
        self.adapter = None
        if is_adapter(self.ft):
            # The output is BASE with the adapter merged in: BASE's names, layout and config.
            self.adapter = LoraAdapter(self.ft, self.rules)
            self.src, self.src_map, self.src_rules = self.base, self.base_map, self.rules
        else:
            if self.ft.config is None:
                raise DowserError(f"{self.ft.where}: no config.json and no adapter_config.json")
            ft_type, base_type = self.ft.config.get("model_type"), self.base.config.get("model_type")
            if ft_type != base_type:
                raise DowserError(f"{self.ft.where}: model_type {ft_type!r} differs from BASE's {base_type!r}")
            self.src = self.ft
            # FT's own config: it may untie the head, or resize the vocabulary
            self.src_rules = KeyRules(None) if plain else KeyRules.of_config(self.ft.config, f"{self.ft.where}/config.json")
            self.src_map = NameMap(self.ft.tensor_names(), self.src_rules, self.ft.where)
        self.components = self.src.components()  # sub-model folders (NVILA: llm/, vision_tower/, ...)
        if self.components and shard_size is not None:
            raise DowserError(f"{self.src.where}: --shard-size does not apply to a checkpoint stored as sub-model "
                              f"folders ({', '.join(self.components)}); its shards are kept as they are")
        # Sidecars that fingerprint each probed weight (tensor_info "fingerprint"): BASE is checked as it is read.
        self._fingerprinted = self.sidecar is not None and any(self.sidecar.fingerprint(n) for n in self.sidecar.shapes)
        self._warned_fingerprint = False
        self._check_provenance()
        # Tensors read, computed and written: a few in flight (WORKERS computing, LOOKAHEAD waiting, one written).
        self._buffers = BufferPool(keep=2 * WORKERS + LOOKAHEAD + 1)
        self.items = self._plan_items()
        self.layout = self._plan_layout()

    # ---- checks and plan ---------------------------------------------
    def _check_provenance(self) -> None:
        if self.sidecar is None:
            return
        recorded = self.sidecar.metadata.get("base_model") or {}
        mask_sha, base_sha = recorded.get("sha"), _local_sha(self.base)
        if mask_sha and base_sha and mask_sha != base_sha:
            msg = (f"{self.sidecar.path}: the mask was probed on {recorded.get('id')}@{mask_sha[:12]}, "
                   f"but BASE {self.base.where} is at {base_sha[:12]}")
            if not self.force:
                raise DowserError(msg + " (pass --force to merge anyway)")
            warn(msg + "; merging anyway (--force)")
        elif mask_sha and not base_sha and not self._fingerprinted:
            warn(f"cannot check that BASE {self.base.where} is the commit the mask was probed on "
                 f"({recorded.get('id')}@{mask_sha[:12]}): BASE is a local folder and the mask has no "
                 f"weight fingerprints")

    def _check_fingerprint(self, item: Item, base: torch.Tensor) -> None:
        """Refuse (warn with --force) a BASE weight that is not the one the mask was probed on."""
        expected = self.sidecar.fingerprint(item.mask_names[0]) if len(item.mask_names) == 1 else None
        if expected is None or tuple(base.shape) != self.sidecar.shapes[item.mask_names[0]]:
            return
        if weight_fingerprint(base) == expected:
            return
        msg = (f"{self.sidecar.path}: {item.base_name!r} in BASE {self.base.where} is not the weight the mask was "
               f"probed on (its fingerprint differs): was the mask made from another model?")
        if not self.force:
            raise DowserError(msg + " (pass --force to merge anyway)")
        if not self._warned_fingerprint:
            self._warned_fingerprint = True
            warn(msg + "; merging anyway (--force)")

    def _refuse(self, msg: str) -> None:
        """A mismatch between mask and tensors: fatal unless --force, then the tensor keeps FT's value."""
        if not self.force:
            raise DowserError(msg + " (pass --force to skip it and keep the fine-tuned values)")
        warn(msg + "; kept the fine-tuned values (--force)")

    def _plan_items(self) -> dict[str, Item]:
        items: dict[str, Item] = {}
        for name in self.src.tensor_names():
            st = TORCH_TO_ST[self.src.dtype(name)]
            canon = self.src_map.to_canonical(name)
            shape = tuple(self.src.shape(name))
            if self.adapter:
                shape = self.adapter.output_shape(canon, shape)
            dtype = self.out_dtype if self.out_dtype and st in FLOAT_DTYPES else st
            items[name] = Item(name, dtype, shape, adapted=bool(self.adapter and self.adapter.touches(canon)))
        if self.adapter:
            for canon in list(self.adapter.pairs) + list(self.adapter.replacements):
                if canon not in self.base_map:
                    raise DowserError(f"{self.ft.where}: the adapter changes {canon!r}, which BASE does not have")
                if canon in self.base_map.tied_alias:
                    raise DowserError(f"{self.ft.where}: the adapter changes {canon!r}, which BASE ties to "
                                      f"{self.base_map.tied_alias[canon]!r}; untie it first")
                self.adapter.check_shape(canon, tuple(self.base.shape(self.base_map.to_checkpoint(canon))))
        base_roles = self.rules.roles(self.base.tensor_names())
        src_roles = self._role_targets()
        self._pair_items(items)
        for mask_name in (self.sidecar.names if self.sidecar is not None else []):
            canon = self.rules.canonical(mask_name)
            role = self.sidecar.roles.get(mask_name)
            if canon not in self.base_map:
                self._refuse(f"{self.sidecar.path}: masks {mask_name!r}, which BASE does not have")
                continue
            base_name = self.base_map.to_checkpoint(canon)
            if role and base_roles.of(role) != base_name:
                raise DowserError(f"{self.sidecar.path}: {mask_name!r} is recorded as the mask of the {role}, but "
                                  f"BASE's {role} is {base_roles.of(role)!r}: was it probed on another model?")
            mask_shape, base_shape = self.sidecar.shapes[mask_name], tuple(self.base.shape(base_name))
            if mask_shape != base_shape:
                self._refuse(f"{self.sidecar.path}: {mask_name!r} has shape {list(mask_shape)} in the mask "
                             f"but {list(base_shape)} in BASE")
                continue
            if role:
                targets = src_roles[role]  # the tensor(s) playing that role in FT, whatever their names
                if not targets:
                    raise DowserError(f"{self.ft.where}: has no {role.replace('_', ' ')}, which {mask_name!r} masks")
            elif canon in self.src_map:
                targets = [self.src_map.to_checkpoint(canon)]
            else:
                raise DowserError(f"{self.ft.where}: has no tensor for {mask_name!r}, which the mask covers")
            for target in targets:
                item = items[target]
                if item.base_name not in (None, base_name):
                    raise DowserError(f"{mask_name!r} and {item.mask_names[0]!r} restore one fine-tuned tensor "
                                      f"{item.name!r} from different BASE tensors")
                self._check_shapes(item, base_shape)
                item.base_name = base_name
                item.mask_names.append(mask_name)
        return items

    def _pair_items(self, items: dict[str, Item]) -> None:
        """Each output tensor's BASE counterpart (same canonical name and shape, floating point), which
        --interpolate blends with it."""
        for item in items.values():
            canon = self.src_map.to_canonical(item.name)
            if canon in self.base_map and item.dtype in FLOAT_DTYPES:
                base_name = self.base_map.to_checkpoint(canon)
                if tuple(self.base.shape(base_name)) == item.shape and TORCH_TO_ST[self.base.dtype(base_name)] in FLOAT_DTYPES:
                    item.pair = base_name

    def _role_targets(self) -> dict[str, list[str]]:
        """The source tensors that play each role (OUTPUT_HEAD, INPUT_EMBEDDING) in the model FT loads as.

        transformers 5 ties the head to the embedding when the config says so, unless both are stored
        with different values: then it loads them untied (and warns). A head stored bit-equal to a
        tied embedding is one tensor under two names, so both names take both roles' masks and stay
        equal. A config that unties a head it does not store cannot load: refused.
        """
        where = self.src.where
        roles = self.src_rules.roles(self.src.tensor_names())
        self.out_roles = roles
        if roles.head is None and roles.embedding is not None:
            raise DowserError(f"{where}/config.json: tie_word_embeddings is false, but the checkpoint stores no "
                              "output head; the config and the tensors disagree")
        head, embed = [roles.head] if roles.head else [], [roles.embedding] if roles.embedding else []
        self.shared_head = bool(roles.tied and head and embed and head != embed
                                and same_bits(self.src.read(head[0]), self.src.read(embed[0])))
        if self.shared_head:
            head = embed = [embed[0], head[0]]
        return {OUTPUT_HEAD: head, INPUT_EMBEDDING: embed}

    def _check_shapes(self, item: Item, base_shape: tuple[int, ...]) -> None:
        if item.shape == base_shape:
            return
        if len(item.shape) == len(base_shape) and item.shape[1:] == base_shape[1:]:
            warn(f"{item.name!r} has {item.shape[0]} rows in FT and {base_shape[0]} in BASE (resized vocabulary?): "
                 f"restoring the {min(item.shape[0], base_shape[0])} rows they share")
            return
        raise DowserError(f"{item.name!r} has shape {list(item.shape)} in FT but {list(base_shape)} in BASE: "
                          "cannot restore it")

    def _plan_layout(self) -> list[tuple[str, list[str]]]:
        """Output shards: (file name, tensor names in file order)."""
        def order(name):
            ref = self.src.ref(name)
            return (ref.file, ref.entry.start if ref.entry else 0)

        names = sorted(self.items, key=order)
        if self.shard_size is None:
            shards: dict[str, list[str]] = {}
            for name in names:
                shards.setdefault(self.src.ref(name).file, []).append(name)
            return [(_safetensors_name(f), ns) for f, ns in shards.items()]
        groups: list[list[str]] = [[]]
        size = 0
        for name in names:
            nbytes = self.items[name].nbytes
            if groups[-1] and size + nbytes > self.shard_size:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        if len(groups) == 1:
            return [("model.safetensors", groups[0])]
        return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]

    def _copyable_shard(self, file: str, names: list[str]) -> str | None:
        """The source shard to copy byte for byte into `file`, if nothing in it changes."""
        if self.shard_size is not None:
            return None
        src_file = self.src.ref(names[0]).file
        if src_file != file:  # a pickled shard becomes safetensors
            return None
        return src_file if all(self._raw(self.items[n]) for n in names) else None

    def _raw(self, item: Item) -> bool:
        """Whether a tensor goes out as its source bytes, undecoded."""
        entry = self.src.ref(item.name).entry
        blended = self._alpha is not None and item.pair is not None
        return entry is not None and not item.mask_names and not item.adapted and entry.dtype == item.dtype and not blended

    # ---- masks --------------------------------------------------------
    @property
    def own_restore(self) -> float | None:
        """The strength of the sidecar's own masks (1 - the update ratio it was cut at)."""
        own = self.sidecar.metadata.get("update_ratio")
        return round(1 - float(own), 10) if isinstance(own, (int, float)) else None

    def strengths(self, restore: list[float] | None) -> list[float | None]:
        """The strengths to write: `restore`, or [None] (the sidecar's own mask) without statistics."""
        if self.sidecar.has_stats:
            return restore or [DEFAULT_RESTORE]
        own_restore = self.own_restore
        if restore is not None and restore != [own_restore]:
            raise DowserError(
                f"{self.sidecar.path}: holds no score statistics, so only its own mask"
                f"{f' (restore {own_restore:g})' if own_restore is not None else ''} can be applied, not "
                f"--restore {','.join(f'{r:g}' for r in restore)}; omit --restore, or probe again with --save-stats"
            )
        if restore is None:
            warn(f"{self.sidecar.path} holds no score statistics: applying its own mask"
                 f"{f', which restores {own_restore:.0%} of each matrix' if own_restore is not None else ''}. "
                 "A training-strength mask largely undoes the fine-tune; probe with --save-stats to choose "
                 f"--restore (default {DEFAULT_RESTORE})")
        return [None]

    def _recut(self, restore: float | None) -> bool:
        """Whether masks are re-cut at this strength. At the sidecar's own strength its stored masks
        are the ones to apply (the ones trained with, and re-cutting costs more than the I/O)."""
        return not (restore is None or (self.own_restore is not None and abs(restore - self.own_restore) < 1e-9))

    def _protected(self, item: Item, base_weight: torch.Tensor, restore: float | None) -> torch.Tensor:
        stored = not self._recut(restore)
        mask = None
        for mask_name in item.mask_names:  # tied weights: an entry is protected if any role protects it
            m = self.sidecar.mask(mask_name) if stored else self.sidecar.recut(mask_name, base_weight, 1.0 - restore)
            mask = m if mask is None else mask | m
        return mask

    # ---- writing ------------------------------------------------------
    def _produce(self, item: Item, restore: float | None):
        """(item, what to write, entries restored): a tensor, raw bytes, or a `_Span` of a local file."""
        if self._raw(item):
            ref = self.src.ref(item.name)
            if not self.src.is_remote:
                return item, _Span(self.src.file_path(ref.file), ref.entry.start, ref.entry.end), 0
            return item, self.src.read_bytes(ref.file, ref.entry.start, ref.entry.end), 0
        return (item, *self._value(item, restore))

    def _finetuned(self, item: Item, canon: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(FT's value of an output tensor in the output dtype, the source tensor it came from)."""
        ft = ft_source = read_tensor(self.src, item.name, self._buffers)
        if self.adapter:
            ft = self.adapter.apply(canon, ft_source)
        return ft.to(DTYPES[item.dtype]), ft_source

    def _value(self, item: Item, restore: float | None) -> tuple[torch.Tensor, int]:
        """The output tensor and how many entries were restored from BASE."""
        canon = self.src_map.to_canonical(item.name)
        ft, ft_source = self._finetuned(item, canon)
        if self._alpha is not None:  # WiSE-FT: BASE + alpha (FT - BASE), every paired tensor
            if item.pair is None:
                return ft, 0
            base = ft_source if self.adapter and item.pair == item.name else self.base.read(item.pair)
            return blend(base.to(ft.dtype), ft, self._alpha), ft.numel()  # entries blended
        if not item.mask_names:
            return ft, 0
        # For an adapter the source is BASE itself: reuse the weight just read.
        own_base = not (self.adapter and item.base_name == item.name)
        base = read_tensor(self.base, item.base_name, self._buffers) if own_base else ft_source
        self._check_fingerprint(item, base)
        kernel = not (self._recut(restore) and (self.sidecar.transposed(item.mask_names[0])  # (out, in) only
                                                or self.sidecar.has_scores))  # the kernel scores from psi/a
        if kernel and len(item.mask_names) == 1 and base.dtype == ft.dtype and base.shape == ft.shape and base.dim() == 2:
            if ft.data_ptr() == base.data_ptr():
                ft = ft.clone()  # the kernels write into FT's tensor
            name = item.mask_names[0]
            if self._recut(restore):
                fast = repair_recut(base, ft, *self.sidecar.stats(name), 1.0 - restore)
            else:
                fast = apply_stored(base, ft, self.sidecar.packed_mask(name))
            if fast is not None:
                if own_base:
                    self._buffers.give_back(base)
                return fast
            ft, _ = self._finetuned(item, canon)  # the sampled bracket missed (FT was overwritten): reference path
        mask = self._protected(item, base, restore)
        base = base.to(ft.dtype)
        rows = min(ft.shape[0], base.shape[0]) if ft.dim() else None
        if rows is not None and (rows != ft.shape[0] or rows != base.shape[0]):
            mask, base = mask[:rows], base[:rows]
            out = ft.clone()
            out[:rows] = _select_bits(mask, base, ft[:rows])
        else:
            out = _select_bits(mask, base, ft)
        return out, int(torch.count_nonzero(mask))

    def write(self, dest: Path, restore: float | None, alpha: float | None = None) -> MergeSummary:
        """Write one output: the sidecar's protected entries restored at strength `restore`, or, with
        `alpha`, every tensor BASE also holds interpolated as BASE + alpha (FT - BASE)."""
        self._alpha = alpha
        start = time.monotonic()
        restored_tensors = restored_entries = copied = 0
        total = sum(item.nbytes for item in self.items.values())
        with atomic_dir(dest) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc=f"merge {dest.name}",
                                           disable=not self.progress, leave=False) as bar:
            copies = {file: self._copyable_shard(file, names) for file, names in self.layout}
            streamed = [self.items[n] for file, names in self.layout if copies[file] is None for n in names]
            # Workers run single-threaded torch ops on a tensor each (intra_op_threads), the main thread
            # writes: both cores compute while the writes go out.
            with ThreadPoolExecutor(WORKERS) as pool, intra_op_threads(1), contextlib.closing(
                _in_order(pool, lambda item: self._produce(item, restore), streamed)
            ) as values:
                mask_sha = pool.submit(_file_sha256, self.sidecar.path) if self.sidecar is not None else None
                since_trim = 0
                for file, names in self.layout:
                    (tmp / file).parent.mkdir(parents=True, exist_ok=True)
                    if copies[file] is not None:
                        shutil.copyfile(self.src.file_path(copies[file]), tmp / file)
                        copied += 1
                        bar.update(sum(self.items[n].nbytes for n in names))
                        continue
                    specs = [(self._key(n), self.items[n].dtype, self.items[n].shape) for n in names]
                    with RangeWriter(tmp / file, specs, self._shard_metadata(names[0])) as writer:
                        for item_name in names:
                            item, data, entries = next(values)
                            name = self._key(item_name)  # the name inside the file
                            if isinstance(data, _Span):
                                writer.copy_range(name, data.path, data.start, data.end)
                            elif isinstance(data, torch.Tensor):
                                writer.write(name, data)
                                self._buffers.give_back(data)
                                since_trim += item.nbytes
                            else:
                                writer.write(name, data)
                            del data
                            if since_trim >= TRIM_EVERY:  # freed pages back to the OS: memory stays a few tensors
                                trim_heap()
                                since_trim = 0
                            restored_tensors += bool(item.mask_names) if alpha is None else bool(entries)
                            restored_entries += entries
                            bar.update(item.nbytes)
                self._mask_sha256 = mask_sha.result() if mask_sha is not None else None
            self._write_index(tmp)
            self._copy_files(tmp)
            summary = MergeSummary(dest, restore, restored_tensors, 0 if alpha is not None else restored_entries,
                                   total, 0.0, copied, alpha)
            self._write_record(tmp, summary)
        summary.seconds = time.monotonic() - start
        return summary

    def _shard_metadata(self, name: str) -> dict:
        ref = self.src.ref(name)
        meta = dict(self.src.header(ref.file).metadata) if ref.entry else {}
        meta.setdefault("format", "pt")
        return meta

    def _key(self, name: str) -> str:
        """A tensor's name inside its file (without the sub-model folder's prefix)."""
        return self.src.ref(name).key or name

    def _write_index(self, tmp: Path) -> None:
        if self.components:  # one index per sub-model folder that had one, naming its own tensors
            for folder, index_name in self.src.indexes.items():
                weight_map = {self._key(n): file[len(folder):] for file, names in self.layout
                              if file.startswith(folder) for n in names}
                total = sum(self.items[n].nbytes for file, names in self.layout if file.startswith(folder) for n in names)
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / index_name).write_text(json.dumps(index, indent=2) + "\n")
            return
        sharded = len(self.layout) > 1 or (self.shard_size is None and self.src.index is not None)
        if not sharded:
            return
        weight_map = {n: file for file, names in self.layout for n in names}
        total = sum(item.nbytes for item in self.items.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _copy_files(self, tmp: Path) -> None:
        """Config, generation config, tokenizer and processor files: FT's (over BASE's for an adapter).
        For sub-model folders (NVILA): every file of FT that the merge does not write, byte for byte."""
        if self.components:
            written = {file for file, _ in self.layout} | set(self.src.indexes.values()) | {REPAIR_RECORD}
            for name in self.src.files():
                if name not in written and not (tmp / name).exists():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.src.file_path(name), tmp / name)
            return
        sources = [self.base, self.ft] if self.adapter else [self.ft]
        for ckpt in sources:
            for name in ckpt.files():
                if "/" in name or name in _NOT_COPIED or not name.endswith(_COPIED_SUFFIXES):
                    continue
                if self.adapter and ckpt is self.ft and name in ("README.md", "config.json"):
                    continue  # the adapter's model card and config describe the adapter, not this model
                shutil.copyfile(ckpt.file_path(name), tmp / name)
        if (tmp / "config.json").is_file():
            self._describe_output(tmp / "config.json")

    def _describe_output(self, path: Path) -> None:
        """Make the copied config describe the tensors written, so the output loads wherever the
        inputs did: vocabulary size (an adapter's resized embedding), tie flag (a head that no longer
        equals the embedding), dtype (--dtype, or tensors stored in another dtype than the config says)."""
        config = json.loads(path.read_text())
        before = json.dumps(config, sort_keys=True)
        key = self.src_rules.text_config_key
        text = config.get(key, config) if key else config
        roles = self.out_roles
        embed = self.items.get(roles.embedding) if roles.embedding else None
        if embed is not None and embed.shape and isinstance(text.get("vocab_size"), int):
            # rows the output adds to (or removes from) the embedding the config described (an adapter's
            # resized copy); not rows = vocab_size, which some families do not keep (Mllama: +8)
            grown = embed.shape[0] - self.src.shape(roles.embedding)[0]
            if grown:
                text["vocab_size"] += grown
        if roles.head and roles.embedding and roles.head != roles.embedding:
            # Both written: tied only if they are still one value (FT stored them equal and nothing
            # the adapter changed makes them differ); transformers 5 unties differing ones anyway.
            adapted = self.adapter and (self.items[roles.head].adapted or self.items[roles.embedding].adapted)
            tied = self.shared_head and not adapted
            for sub in (config, text):
                if "tie_word_embeddings" in sub or sub is config:
                    sub["tie_word_embeddings"] = tied
        floats = {item.dtype for item in self.items.values() if item.dtype in FLOAT_DTYPES}
        if len(floats) == 1:
            name = str(DTYPES[floats.pop()]).removeprefix("torch.")
            for sub in [config] + [v for v in config.values() if isinstance(v, dict)]:
                for key in ("dtype", "torch_dtype"):
                    if key in sub:
                        sub[key] = name
        if json.dumps(config, sort_keys=True) != before:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _write_record(self, tmp: Path, summary: MergeSummary) -> None:
        def ckpt_record(ckpt: Checkpoint) -> dict:
            source = ckpt.source if ckpt.is_remote or _local_sha(ckpt) else str(Path(ckpt.source).resolve())
            return {"id": source, "revision": ckpt.revision, "sha": _local_sha(ckpt)}

        own = self.sidecar.metadata.get("update_ratio") if self.sidecar is not None else None
        record = {
            "tool": "dowser-tool",
            "tool_version": __version__,
            "base": ckpt_record(self.base),
            "finetuned": {**ckpt_record(self.ft), "kind": "lora-adapter" if self.adapter else "full"},
            "mask": None if self.sidecar is None else {
                "path": str(self.sidecar.path.resolve()),
                "sha256": self._mask_sha256,
                "base_model": self.sidecar.metadata.get("base_model"),
                "has_stats": self.sidecar.has_stats,
            },
            "repair": {"method": "interpolate", "alpha": summary.alpha} if summary.alpha is not None else
                      {"method": "restore"},
            "restore": None if summary.alpha is not None else summary.restore if summary.restore is not None else (
                round(1 - own, 10) if isinstance(own, (int, float)) else None),
            "mask_source": None if summary.alpha is not None else
                           "sidecar mask" if summary.restore is None else "re-cut from statistics",
            "dtype": self.out_dtype and str(DTYPES[self.out_dtype]).removeprefix("torch."),
            "tensors_restored": summary.tensors_restored,
            "entries_restored": summary.entries_restored,
        }
        (tmp / REPAIR_RECORD).write_text(json.dumps(record, indent=2) + "\n")


@dataclass(frozen=True)
class _Span:
    """Bytes [start, end) of a local file: an unchanged tensor, copied by the kernel."""

    path: Path
    start: int
    end: int


def _safetensors_name(file: str) -> str:
    """Output name of a source shard (pickled shards become safetensors)."""
    if file.endswith(".bin"):
        return file[: -len(".bin")].replace("pytorch_model", "model") + ".safetensors"
    return file


def _in_order(pool: ThreadPoolExecutor, fn, items):
    """fn(item) for each item, in order, computed up to LOOKAHEAD items ahead on the pool.

    Reads, re-cuts and the writer's I/O overlap (torch and file reads release the GIL);
    the window bounds memory to a few tensors. Unstarted work is cancelled when the
    consumer stops early.
    """
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > LOOKAHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _select_bits(mask: torch.Tensor, base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """where(mask, base, ft) on the raw bits, so every value (NaN payloads, -0.0) is copied exactly."""
    as_int = SAME_SIZE_INT[base.element_size()]
    out = torch.where(mask, base.contiguous().view(as_int), ft.contiguous().view(as_int))
    return out.view(base.dtype)


def output_dirs(out, restore: list[float | None], prefix: str = "r") -> list[Path]:
    """One output per strength: OUT itself, or OUT-r0.1, OUT-r0.3, ... (OUT-a0.5, ... for --interpolate)."""
    out = Path(out)
    if len(restore) == 1:
        return [out]
    return [out.with_name(f"{out.name}-{prefix}{r:g}") for r in restore]


def merge_checkpoint(
    base,
    finetuned,
    mask,
    out,
    *,
    restore: float | Sequence[float] | str | None = None,
    update_ratio: float | Sequence[float] | str | None = None,
    interpolate: float | Sequence[float] | str | None = None,
    base_revision: str | None = None,
    finetuned_revision: str | None = None,
    shard_size: int | None = None,
    dtype: str = "keep",
    allow_pickle: bool = False,
    force: bool = False,
    progress: bool = True,
    mask_revision: str | None = None,
) -> list[MergeSummary]:
    """Repair FT from BASE with a mask sidecar; write one checkpoint per repair strength.

    `restore` F (default DEFAULT_RESTORE, 0.1) protects the top-F fraction of each masked matrix by score;
    `update_ratio` R is the same as restore 1-R. Several values write OUT-r<F> folders.
    `interpolate` alpha instead writes BASE + alpha (FT - BASE) for every floating-point tensor both hold
    (WiSE-FT, Wortsman et al. 2022; task-vector scaling), OUT-a<alpha> for several; `mask` may then be None.
    `mask` may be a Hub reference (`REPO_ID` or `REPO_ID/FILE`, at `mask_revision`; see
    `sidecar.resolve_sidecar`). Returns one summary per output. Raises DowserError for any bad or
    disagreeing input.
    """
    if shard_size is not None and shard_size <= 0:
        raise DowserError(f"--shard-size must be positive, got {shard_size}")
    alphas = None
    if interpolate is not None:
        if restore is not None or update_ratio is not None:
            raise DowserError("pass --interpolate or --restore/--update-ratio, not both")
        alphas = parse_fractions(interpolate, "--interpolate") if isinstance(interpolate, str) else (
            [float(a) for a in interpolate] if isinstance(interpolate, (list, tuple)) else [float(interpolate)])
        if any(not 0.0 <= a <= 1.0 for a in alphas) or len(set(alphas)) != len(alphas):
            raise DowserError("--interpolate takes distinct weights in [0, 1]")
    elif mask is None:
        raise DowserError("--mask is required (only --interpolate works without one)")
    strengths = None if alphas else _restore_values(restore, update_ratio)
    mask = resolve_sidecar(mask, mask_revision) if mask is not None else None
    # Checked before any work; a sidecar without statistics allows one output only, so these stay right.
    names = output_dirs(out, alphas, "a") if alphas else output_dirs(out, strengths or [None])
    dests = [check_destination(d, force, inputs=[base, finetuned, mask]) for d in names]
    merge = Merge(base, finetuned, mask, base_revision=base_revision, finetuned_revision=finetuned_revision,
                  shard_size=shard_size, dtype=dtype, allow_pickle=allow_pickle, force=force, progress=progress)
    if alphas:
        return [merge.write(dest, None, alpha) for dest, alpha in zip(dests, alphas)]
    strengths = merge.strengths(strengths)
    return [merge.write(dest, strength) for dest, strength in zip(dests, strengths)]
