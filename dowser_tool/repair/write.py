"""The writer of a merge: each output tensor's value, produced and streamed into its shard.

Given a `repair.plan.MergePlan`, `MergeWriter.write` writes one output: shards header-first,
one tensor in memory at a time (a few in flight on worker threads), shards that need no change
copied byte for byte and unchanged tensors inside rewritten shards copied as raw bytes, never
decoded; then the index, FT's (or BASE's) config and tokenizer files, the config made to describe
the tensors written, and the repair record. It decides nothing the plan has not.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..io.checkpoint import (
    ADAPTER_CONFIG,
    PICKLE_INDEX,
    SAFETENSORS_INDEX,
    SAME_SIZE_INT,
    Checkpoint,
)
from ..io.layout import DTYPES
from ..io.outputs import atomic_dir, file_sha256
from ..model.quant import dequantize
from ..model.streaming import trim_heap
from .kernels import (
    BufferPool,
    RangeWriter,
    apply_stored,
    intra_op_threads,
    read_tensor,
    repair_recut,
)
from .methods import interpolate as blend
from .plan import FLOAT_DTYPES, Item, MergePlan, local_sha

REPAIR_RECORD = "dowser_repair.json"
# Non-weight files copied from FT (top level only: repos may hold e.g. original/*.pth).
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".tiktoken", ".py")
_NOT_COPIED = {SAFETENSORS_INDEX, PICKLE_INDEX, ADAPTER_CONFIG, REPAIR_RECORD}
# Tensors prepared ahead of the writer, and threads preparing them: a few tensors in memory at most.
WORKERS, LOOKAHEAD = 2, 2
TRIM_EVERY = 256 << 20  # bytes of decoded tensors written between heap trims (a trim walks the whole heap)


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


@dataclass(frozen=True)
class _Span:
    """Bytes [start, end) of a local file: an unchanged tensor, copied by the kernel."""

    path: Path
    start: int
    end: int


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


class MergeWriter:
    """A planned merge's values and files; `write(dest, restore)` writes one output."""

    def __init__(self, plan: MergePlan, *, progress=True):
        self.plan, self.progress = plan, progress
        self._alpha: float | None = None
        self._mask_sha256: str | None = None
        # Tensors read, computed and written: a few in flight (WORKERS computing, LOOKAHEAD waiting, one written).
        self._buffers = BufferPool(keep=2 * WORKERS + LOOKAHEAD + 1)

    # ---- values ---------------------------------------------------------
    def _protected(self, item: Item, base_weight: torch.Tensor, restore: float | None) -> torch.Tensor:
        sidecar, stored = self.plan.sidecar, not self.plan.recut(restore)
        mask = None
        for mask_name in item.mask_names:  # tied weights: an entry is protected if any role protects it
            m = sidecar.mask(mask_name) if stored else sidecar.recut(mask_name, base_weight, 1.0 - restore)
            mask = m if mask is None else mask | m
        return mask

    def _produce(self, item: Item, restore: float | None):
        """(item, what to write, entries restored): a tensor, raw bytes, or a `_Span` of a local file."""
        src = self.plan.src
        if self.plan.raw(item, self._alpha):
            ref = src.ref(item.name)
            if not src.is_remote:
                return item, _Span(src.file_path(ref.file), ref.entry.start, ref.entry.end), 0
            return item, src.read_bytes(ref.file, ref.entry.start, ref.entry.end), 0
        return (item, *self._value(item, restore))

    def _finetuned(self, item: Item, canon: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(FT's value of an output tensor in the output dtype, the source tensor it came from)."""
        q = self.plan.dequant
        if q is not None and item.name in q.weights:  # an FP8 / bitsandbytes 8-bit FT: its float weight, rebuilt
            ft = ft_source = dequantize(q, item.name, self.plan.src.read)
        else:
            ft = ft_source = read_tensor(self.plan.src, item.name, self._buffers)
        if self.plan.adapter:
            ft = self.plan.adapter.apply(canon, ft_source)
        return ft.to(DTYPES[item.dtype]), ft_source

    def _value(self, item: Item, restore: float | None) -> tuple[torch.Tensor, int]:
        """The output tensor and how many entries were restored from BASE."""
        plan = self.plan
        canon = plan.src_map.to_canonical(item.name)
        ft, ft_source = self._finetuned(item, canon)
        if self._alpha is not None:  # WiSE-FT: BASE + alpha (FT - BASE), every paired tensor
            if item.pair is None:
                return ft, 0
            base = ft_source if plan.adapter and item.pair == item.name else plan.base.read(item.pair)
            return blend(base.to(ft.dtype), ft, self._alpha), ft.numel()  # entries blended
        if not item.mask_names:
            return ft, 0
        # For an adapter the source is BASE itself: reuse the weight just read.
        own_base = not (plan.adapter and item.base_name == item.name)
        base = read_tensor(plan.base, item.base_name, self._buffers) if own_base else ft_source
        plan.check_fingerprint(item, base)
        kernel = not (plan.recut(restore) and (plan.sidecar.transposed(item.mask_names[0])  # (out, in) only
                                               or plan.sidecar.has_scores))  # the kernel scores from psi/a
        if kernel and len(item.mask_names) == 1 and base.dtype == ft.dtype and base.shape == ft.shape and base.dim() == 2:
            if ft.data_ptr() == base.data_ptr():
                ft = ft.clone()  # the kernels write into FT's tensor
            name = item.mask_names[0]
            if plan.recut(restore):
                fast = repair_recut(base, ft, *plan.sidecar.stats(name), 1.0 - restore)
            else:
                fast = apply_stored(base, ft, plan.sidecar.packed_mask(name))
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

    # ---- files ----------------------------------------------------------
    def write(self, dest: Path, restore: float | None, alpha: float | None = None) -> MergeSummary:
        """Write one output: the sidecar's protected entries restored at strength `restore`, or, with
        `alpha`, every tensor BASE also holds interpolated as BASE + alpha (FT - BASE)."""
        plan = self.plan
        self._alpha = alpha
        start = time.monotonic()
        self._counts = [0, 0]  # tensors restored, entries restored
        copied = 0
        total = sum(item.nbytes for item in plan.items.values())
        with atomic_dir(dest) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc=f"merge {dest.name}",
                                           disable=not self.progress, leave=False) as bar:
            copies = {file: plan.copyable_shard(file, names, alpha) for file, names in plan.layout}
            streamed = [plan.items[n] for file, names in plan.layout if copies[file] is None for n in names]
            # Workers run single-threaded torch ops on a tensor each (intra_op_threads), the main thread
            # writes: both cores compute while the writes go out.
            with ThreadPoolExecutor(WORKERS) as pool, intra_op_threads(1), contextlib.closing(
                _in_order(pool, lambda item: self._produce(item, restore), streamed)
            ) as values:
                mask_sha = pool.submit(file_sha256, plan.sidecar.path) if plan.sidecar is not None else None
                self._since_trim = 0
                for file, names in plan.layout:
                    (tmp / file).parent.mkdir(parents=True, exist_ok=True)
                    if copies[file] is not None:
                        shutil.copyfile(plan.src.file_path(copies[file]), tmp / file)
                        copied += 1
                        bar.update(sum(plan.items[n].nbytes for n in names))
                        continue
                    self._write_shard(tmp / file, names, values, bar)
                self._mask_sha256 = mask_sha.result() if mask_sha is not None else None
            self._write_index(tmp)
            self._copy_files(tmp)
            restored_tensors, restored_entries = self._counts
            summary = MergeSummary(dest, restore, restored_tensors, 0 if alpha is not None else restored_entries,
                                   total, 0.0, copied, alpha)
            (tmp / REPAIR_RECORD).write_text(json.dumps(repair_record(plan, summary, self._mask_sha256), indent=2) + "\n")
        summary.seconds = time.monotonic() - start
        return summary

    def _write_shard(self, path: Path, names: list[str], values, bar) -> None:
        """One rewritten shard: each tensor's value, in file order, as the workers produce them."""
        items = self.plan.items
        specs = [(self._key(n), items[n].dtype, items[n].shape) for n in names]
        with RangeWriter(path, specs, self._shard_metadata(names[0])) as writer:
            for item_name in names:
                item, data, entries = next(values)
                name = self._key(item_name)  # the name inside the file
                if isinstance(data, _Span):
                    writer.copy_range(name, data.path, data.start, data.end)
                elif isinstance(data, torch.Tensor):
                    writer.write(name, data)
                    self._buffers.give_back(data)
                    self._since_trim += item.nbytes
                else:
                    writer.write(name, data)
                del data
                if self._since_trim >= TRIM_EVERY:  # freed pages back to the OS: memory stays a few tensors
                    trim_heap()
                    self._since_trim = 0
                self._counts[0] += bool(item.mask_names) if self._alpha is None else bool(entries)
                self._counts[1] += entries
                bar.update(item.nbytes)

    def _shard_metadata(self, name: str) -> dict:
        src = self.plan.src
        ref = src.ref(name)
        meta = dict(src.header(ref.file).metadata) if ref.entry else {}
        meta.setdefault("format", "pt")
        return meta

    def _key(self, name: str) -> str:
        """A tensor's name inside its file (without the sub-model folder's prefix)."""
        return self.plan.src.ref(name).key or name

    def _write_index(self, tmp: Path) -> None:
        plan = self.plan
        if plan.components:  # one index per sub-model folder that had one, naming its own tensors
            for folder, index_name in plan.src.indexes.items():
                weight_map = {self._key(n): file[len(folder):] for file, names in plan.layout
                              if file.startswith(folder) for n in names}
                total = sum(plan.items[n].nbytes for file, names in plan.layout if file.startswith(folder) for n in names)
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / index_name).write_text(json.dumps(index, indent=2) + "\n")
            return
        sharded = len(plan.layout) > 1 or (plan.shard_size is None and plan.src.index is not None)
        if not sharded:
            return
        weight_map = {n: file for file, names in plan.layout for n in names}
        total = sum(item.nbytes for item in plan.items.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _copy_files(self, tmp: Path) -> None:
        """Config, generation config, tokenizer and processor files: FT's (over BASE's for an adapter).
        For sub-model folders (NVILA): every file of FT that the merge does not write, byte for byte."""
        plan = self.plan
        if plan.components:
            written = {file for file, _ in plan.layout} | set(plan.src.indexes.values()) | {REPAIR_RECORD}
            for name in plan.src.files():
                if name not in written and not (tmp / name).exists():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(plan.src.file_path(name), tmp / name)
            return
        sources = [plan.base, plan.ft] if plan.adapter else [plan.ft]
        for ckpt in sources:
            for name in ckpt.files():
                if "/" in name or name in _NOT_COPIED or not name.endswith(_COPIED_SUFFIXES):
                    continue
                if plan.adapter and ckpt is plan.ft and name in ("README.md", "config.json"):
                    continue  # the adapter's model card and config describe the adapter, not this model
                shutil.copyfile(ckpt.file_path(name), tmp / name)
        if (tmp / "config.json").is_file():
            describe_output(plan, tmp / "config.json")


def describe_output(plan: MergePlan, path: Path) -> None:
    """Make the copied config describe the tensors written, so the output loads wherever the
    inputs did: vocabulary size (an adapter's resized embedding), tie flag (a head that no longer
    equals the embedding), dtype (--dtype, or tensors stored in another dtype than the config says)."""
    config = json.loads(path.read_text())
    before = json.dumps(config, sort_keys=True)
    key = plan.src_rules.text_config_key
    text = config.get(key, config) if key else config
    if plan.dequant is not None:  # every weight written is a float: no quantized layout is claimed
        for sub in (config, text):
            sub.pop("quantization_config", None)
    roles = plan.out_roles
    embed = plan.items.get(roles.embedding) if roles.embedding else None
    if embed is not None and embed.shape and isinstance(text.get("vocab_size"), int):
        # rows the output adds to (or removes from) the embedding the config described (an adapter's
        # resized copy); not rows = vocab_size, which some families do not keep (Mllama: +8)
        grown = embed.shape[0] - plan.src.shape(roles.embedding)[0]
        if grown:
            text["vocab_size"] += grown
    if roles.head and roles.embedding and roles.head != roles.embedding:
        # Both written: tied only if they are still one value (FT stored them equal and nothing
        # the adapter changed makes them differ); transformers 5 unties differing ones anyway.
        adapted = plan.adapter and (plan.items[roles.head].adapted or plan.items[roles.embedding].adapted)
        tied = plan.shared_head and not adapted
        for sub in (config, text):
            if "tie_word_embeddings" in sub or sub is config:
                sub["tie_word_embeddings"] = tied
    floats = {item.dtype for item in plan.items.values() if item.dtype in FLOAT_DTYPES}
    if len(floats) == 1:
        name = str(DTYPES[floats.pop()]).removeprefix("torch.")
        for sub in [config] + [v for v in config.values() if isinstance(v, dict)]:
            for key in ("dtype", "torch_dtype"):
                if key in sub:
                    sub[key] = name
    if json.dumps(config, sort_keys=True) != before:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def repair_record(plan: MergePlan, summary: MergeSummary, mask_sha256: str | None) -> dict:
    """The output's `dowser_repair.json`: its inputs, the repair and what it changed."""
    def ckpt_record(ckpt: Checkpoint) -> dict:
        source = ckpt.source if ckpt.is_remote or local_sha(ckpt) else str(Path(ckpt.source).resolve())
        return {"id": source, "revision": ckpt.revision, "sha": local_sha(ckpt)}

    sidecar = plan.sidecar
    own = sidecar.metadata.get("update_ratio") if sidecar is not None else None
    return {
        "tool": "dowser-tool",
        "tool_version": __version__,
        "base": ckpt_record(plan.base),
        "finetuned": {**ckpt_record(plan.ft), "kind": plan.adapter.kind if plan.adapter else "full",
                      "dequantized": plan.dequant.scheme if plan.dequant is not None else None},
        "mask": None if sidecar is None else {
            "path": str(sidecar.path.resolve()),
            "sha256": mask_sha256,
            "base_model": sidecar.metadata.get("base_model"),
            "has_stats": sidecar.has_stats,
        },
        "repair": {"method": "interpolate", "alpha": summary.alpha} if summary.alpha is not None else
                  {"method": "restore"},
        "restore": None if summary.alpha is not None else summary.restore if summary.restore is not None else (
            round(1 - own, 10) if isinstance(own, (int, float)) else None),
        "mask_source": None if summary.alpha is not None else
                       "sidecar mask" if summary.restore is None else "re-cut from statistics",
        "dtype": plan.out_dtype and str(DTYPES[plan.out_dtype]).removeprefix("torch."),
        "tensors_restored": summary.tensors_restored,
        "entries_restored": summary.entries_restored,
    }
