"""The plan of a merge: what each output tensor is made of, checked before anything is written.

A `MergePlan` opens BASE, FT (or a LoRA adapter on BASE) and the mask sidecar, pairs their names,
finds the tensors that play each role (head, embedding), checks shapes and provenance, lays the
output out in shards and settles the repair strengths. Every check that can refuse a merge runs
here, except the weight fingerprints, which are checked as BASE is read (`check_fingerprint`).
Nothing is written: `explain` lists what an output would hold (`dowser merge --dry-run`), and
`repair.write.MergeWriter` produces the values and the files.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DowserError
from ..io.checkpoint import Checkpoint, open_checkpoint, same_bits
from ..io.layout import TORCH_TO_ST, itemsize
from ..model.keys import KeyRules, NameMap, mask_aliases
from ..model.quant import Quantization, detect_checkpoint, refuse
from ..sidecar.file import INPUT_EMBEDDING, OUTPUT_HEAD, Sidecar, weight_fingerprint
from .lora import is_adapter, open_adapter

# The forgetting benchmark (benchmarks/forgetting/RESULTS.md, 8 seeds, both models, three depths):
# as one setting nobody tunes, restoring the top 10% did as well as any single setting tried (mean H
# 0.430; the best single interpolation weight 0.415); with evaluation at hand, sweeping --interpolate
# is the better repair. No Dowser-statistics repair beat interpolation, so none is the default.
DEFAULT_RESTORE = 0.1
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
OUTPUT_DTYPES = {"keep": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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


def local_sha(ckpt: Checkpoint) -> str | None:
    """A checkpoint's commit: the Hub's, or a HF-cache snapshot folder's name."""
    if ckpt.sha:
        return ckpt.sha
    path = Path(ckpt.source)
    if path.parent.name == "snapshots" and len(path.name) == 40:
        return path.name
    return None


def safetensors_name(file: str) -> str:
    """Output name of a source shard (pickled shards become safetensors)."""
    if file.endswith(".bin"):
        return file[: -len(".bin")].replace("pytorch_model", "model") + ".safetensors"
    return file


def plan_layout(src: Checkpoint, items: dict[str, Item], shard_size: int | None) -> list[tuple[str, list[str]]]:
    """Output shards: (file name, tensor names in file order); the source's shards, or `shard_size` ones."""
    def order(name):
        ref = src.ref(name)
        return (ref.file, ref.entry.start if ref.entry else 0)

    names = sorted(items, key=order)
    if shard_size is None:
        shards: dict[str, list[str]] = {}
        for name in names:
            shards.setdefault(src.ref(name).file, []).append(name)
        return [(safetensors_name(f), ns) for f, ns in shards.items()]
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = items[name].nbytes
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


def check_shapes(item: Item, base_shape: tuple[int, ...]) -> None:
    """A masked tensor's shape in FT against BASE's: equal, or (a resized vocabulary) only its rows differ."""
    if item.shape == base_shape:
        return
    if len(item.shape) == len(base_shape) and item.shape[1:] == base_shape[1:]:
        warn(f"{item.name!r} has {item.shape[0]} rows in FT and {base_shape[0]} in BASE (resized vocabulary?): "
             f"restoring the {min(item.shape[0], base_shape[0])} rows they share")
        return
    raise DowserError(f"{item.name!r} has shape {list(item.shape)} in FT but {list(base_shape)} in BASE: "
                      "cannot restore it")


def refuse_quantized(ckpt: Checkpoint, role: str, dequantize_ok: bool = False) -> Quantization | None:
    """A quantized checkpoint (bitsandbytes, FP8, GPTQ/AWQ, compressed-tensors: `model.quant.detect`)
    is refused in one line naming its scheme: its integers or FP8 codes are not weights, and BASE's
    floats written into them (or theirs restored into floats) would be silently wrong. With
    `dequantize_ok` (FT), a bitsandbytes 8-bit or block-scaled FP8 checkpoint, whose float weights
    `model.quant.dequantize` rebuilds from what is stored, is returned instead: merged dequantized."""
    found = detect_checkpoint(ckpt)
    if found is None:
        return None
    if dequantize_ok and found.dequantizable and (found.scheme == "bitsandbytes 8-bit" or found.scheme.startswith("fp8")):
        warn(f"{role} {ckpt.where} is {found.describe()}: its weights are dequantized (codes x scales, in float32) "
             "into FT's float dtype, and the output is a float checkpoint (no quantization_config)")
        return found
    raise refuse(found, f"{role} {ckpt.where}", "merge")


def dequantized_dtype(plan: MergePlan, canon: str) -> str:
    """The dtype a dequantized FT weight is written in: the one FT's config names (that of its float
    tensors), else BASE's for the same tensor, else float32."""
    config = plan.ft.config or {}
    declared = OUTPUT_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")))
    if declared:
        return declared
    if canon in plan.base_map:
        st = TORCH_TO_ST[plan.base.dtype(plan.base_map.to_checkpoint(canon))]
        if st in FLOAT_DTYPES:
            return st
    return "F32"


def float_config(config: dict | None) -> dict | None:
    """A config without its `quantization_config` (the model class built for names, of a dequantized FT)."""
    return {k: v for k, v in config.items() if k != "quantization_config"} if config else config


def check_float(item: Item, base_dtype: str, where: str) -> None:
    """A masked tensor is restored only from and into floating-point tensors (no quantized codes)."""
    for dtype, whose in ((item.dtype, "FT"), (base_dtype, "BASE")):
        if dtype not in FLOAT_DTYPES:
            raise DowserError(f"{where}: {item.name!r} is stored as {dtype} in {whose}, not as floating point: "
                              "a quantized or integer tensor cannot take BASE's entries; dequantize it first")


def sidecar_layouts(sidecar: Sidecar | None, rules: KeyRules):
    """{canonical name: stored (in, out)} for the masked weights whose layout the sidecar records
    (`tensor_info` layout), as a lookup (None when the sidecar records none)."""
    if sidecar is None:
        return None
    info = sidecar.metadata.get("tensor_info") or {}
    return {rules.canonical(n): (info.get(n) or {}).get("layout") == "in_out" for n in sidecar.names
            if (info.get(n) or {}).get("layout")}.get


def check_vocabulary(plan: MergePlan) -> None:
    """An adapter that resizes the input embedding but not a separate output head (or the reverse)
    leaves two vocabulary sizes that no config describes (`from_pretrained` fails on a size mismatch):
    refused. (A tied head is the embedding itself; a full fine-tune brings its own config.)"""
    roles = plan.out_roles
    if not plan.adapter or not roles.head or not roles.embedding or roles.head == roles.embedding:
        return
    embed, head = plan.items[roles.embedding], plan.items[roles.head]
    grown_embed = embed.shape[0] - plan.src.shape(roles.embedding)[0]
    grown_head = head.shape[0] - plan.src.shape(roles.head)[0]
    if grown_embed != grown_head:
        raise DowserError(
            f"{plan.ft.where}: the adapter stores the input embedding resized to {embed.shape[0]} rows but the output "
            f"head {roles.head!r} at {head.shape[0]} rows (BASE has {plan.src.shape(roles.embedding)[0]} and "
            f"{plan.src.shape(roles.head)[0]}): no config describes both, and the resized head's rows were not saved; "
            "save the adapter with the head too (peft: modules_to_save=['lm_head']), or merge it with peft "
            "(merge_and_unload) and pass the merged model")


def refuse_fused_experts(plan: MergePlan, mask_name: str) -> None:
    """A fine-tune saved with its experts fused (transformers 5 `save_pretrained(save_original_format=False)`:
    one 3-D `mlp.experts.gate_up_proj` per layer) against a BASE and mask stored per expert: refused
    by name (the mask's per-expert entries are not placed into fused tensors)."""
    shapes = {n: plan.sidecar.shapes[n] for n in plan.sidecar.names}
    placed = plan.src_rules.expert_placement(shapes).get(mask_name)
    if placed is not None and placed[0] in plan.src_map:
        raise DowserError(
            f"{plan.ft.where}: stores its experts fused ({placed[0]!r}, as save_pretrained(save_original_format=False) "
            f"writes them) while BASE and the mask hold them per expert ({mask_name!r}): fused-expert fine-tunes are "
            "not supported; save FT with save_original_format=True (the default) and merge that")


def role_targets(src: Checkpoint, src_rules: KeyRules) -> tuple[object, bool, dict[str, list[str]]]:
    """The source tensors that play each role (OUTPUT_HEAD, INPUT_EMBEDDING) in the model FT loads as:
    (its roles, whether a stored head is the tied embedding's very bits, role -> tensor names).

    transformers 5 ties the head to the embedding when the config says so, unless both are stored
    with different values: then it loads them untied (and warns). A head stored bit-equal to a
    tied embedding is one tensor under two names, so both names take both roles' masks and stay
    equal. A config that unties a head it does not store cannot load: refused.
    """
    roles = src_rules.roles(src.tensor_names())
    if roles.head is None and roles.embedding is not None and src_rules.head is not None:  # a score head: no LM head
        raise DowserError(f"{src.where}/config.json: tie_word_embeddings is false, but the checkpoint stores no "
                          "output head; the config and the tensors disagree")
    head, embed = [roles.head] if roles.head else [], [roles.embedding] if roles.embedding else []
    shared_head = bool(roles.tied and head and embed and head != embed
                       and same_bits(src.read(head[0]), src.read(embed[0])))
    if shared_head:
        head = embed = [embed[0], head[0]]
    return roles, shared_head, {OUTPUT_HEAD: head, INPUT_EMBEDDING: embed}


class MergePlan:
    """Inputs opened and checked, and the output planned: `items` (each output tensor, by source name)
    and `layout` (output shards: file name, tensor names in file order)."""

    def __init__(self, base, finetuned, mask, *, base_revision=None, finetuned_revision=None,
                 shard_size=None, dtype="keep", allow_pickle=False, force=False):
        if dtype not in OUTPUT_DTYPES:
            raise DowserError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
        self.out_dtype = OUTPUT_DTYPES[dtype]
        self.shard_size, self.force = shard_size, force
        self.sidecar = Sidecar(mask) if mask is not None else None  # None: --interpolate without a mask
        self.base = open_checkpoint(base, base_revision, allow_pickle=allow_pickle)
        self.ft = open_checkpoint(finetuned, finetuned_revision, allow_pickle=allow_pickle)
        if self.base.config is None:
            raise DowserError(f"{self.base.where}: no config.json (BASE must be a full model)")
        refuse_quantized(self.base, "BASE")  # before any model class is built from a quantization_config
        self.dequant = refuse_quantized(self.ft, "FT", dequantize_ok=True)  # None, or FT's dequantizable scheme
        self._open_source()
        self.components = self.src.components()  # sub-model folders (NVILA: llm/, vision_tower/, ...)
        if self.components and shard_size is not None:
            raise DowserError(f"{self.src.where}: --shard-size does not apply to a checkpoint stored as sub-model "
                              f"folders ({', '.join(self.components)}); its shards are kept as they are")
        # Sidecars that fingerprint each probed weight (tensor_info "fingerprint"): BASE is checked as it is read.
        self._fingerprinted = self.sidecar is not None and any(self.sidecar.fingerprint(n) for n in self.sidecar.shapes)
        self._warned_fingerprint = False
        self.refused: list[tuple[str, str]] = []  # (mask name, why): skipped with --force, FT's value kept
        self._check_provenance()
        self.items = self._plan_items()
        check_vocabulary(self)
        self.layout = plan_layout(self.src, self.items, shard_size)

    def _open_source(self) -> None:
        """Key rules and name maps of BASE and of the source of the output's tensors (FT, or BASE
        for a LoRA adapter, which `adapter` then applies)."""
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
            self.adapter = open_adapter(self.ft, self.rules, sidecar_layouts(self.sidecar, self.rules))
            self.src, self.src_map, self.src_rules = self.base, self.base_map, self.rules
            return
        if self.ft.config is None:
            raise DowserError(f"{self.ft.where}: no config.json and no adapter_config.json")
        ft_type, base_type = self.ft.config.get("model_type"), self.base.config.get("model_type")
        if ft_type != base_type:
            raise DowserError(f"{self.ft.where}: model_type {ft_type!r} differs from BASE's {base_type!r}")
        self.src = self.ft
        # FT's own config: it may untie the head, or resize the vocabulary
        self.src_rules = KeyRules(None) if plain else KeyRules.of_config(float_config(self.ft.config),
                                                                          f"{self.ft.where}/config.json")
        self.src_map = NameMap(self.ft.tensor_names(), self.src_rules, self.ft.where)

    # ---- checks -------------------------------------------------------
    def _check_provenance(self) -> None:
        if self.sidecar is None:
            return
        recorded = self.sidecar.metadata.get("base_model") or {}
        mask_sha, base_sha = recorded.get("sha"), local_sha(self.base)
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

    def check_fingerprint(self, item: Item, base: torch.Tensor) -> None:
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

    def check_fingerprints(self) -> None:
        """Every fingerprinted BASE weight the output restores, read and checked (a dry run's check;
        a merge checks each as it reads it)."""
        for item in self.items.values():
            if item.mask_names and len(item.mask_names) == 1 and self.sidecar.fingerprint(item.mask_names[0]):
                self.check_fingerprint(item, self.base.read(item.base_name))

    def _refuse(self, mask_name: str, msg: str) -> None:
        """A mismatch between mask and tensors: fatal unless --force, then the tensor keeps FT's value."""
        if not self.force:
            raise DowserError(msg + " (pass --force to skip it and keep the fine-tuned values)")
        warn(msg + "; kept the fine-tuned values (--force)")
        self.refused.append((mask_name, msg))

    def _check_adapter(self) -> None:
        """Refuse an adapter that changes what BASE lacks or ties, or whose update does not fit."""
        for canon in list(self.adapter.pairs) + list(self.adapter.replacements):
            if canon not in self.base_map:
                raise DowserError(f"{self.ft.where}: the adapter changes {canon!r}, which BASE does not have")
            if canon in self.base_map.tied_alias:
                raise DowserError(f"{self.ft.where}: the adapter changes {canon!r}, which BASE ties to "
                                  f"{self.base_map.tied_alias[canon]!r}; untie it first")
            self.adapter.check_shape(canon, tuple(self.base.shape(self.base_map.to_checkpoint(canon))))

    # ---- what each output tensor is made of ----------------------------
    def _plan_items(self) -> dict[str, Item]:
        items: dict[str, Item] = {}
        for name in self.src.tensor_names():
            st = TORCH_TO_ST[self.src.dtype(name)]
            canon = self.src_map.to_canonical(name)
            if self.dequant is not None and name in self.dequant.companions:
                continue  # scales and formats: folded into the dequantized weights
            if self.dequant is not None and name in self.dequant.weights:
                st = dequantized_dtype(self, canon)
            shape = tuple(self.src.shape(name))
            if self.adapter:
                shape = self.adapter.output_shape(canon, shape)
            dtype = self.out_dtype if self.out_dtype and st in FLOAT_DTYPES else st
            items[name] = Item(name, dtype, shape, adapted=bool(self.adapter and self.adapter.touches(canon)))
        if self.adapter:
            self._check_adapter()
        base_roles = self.rules.roles(self.base.tensor_names())
        self.out_roles, self.shared_head, src_roles = role_targets(self.src, self.src_rules)
        self._pair_items(items)
        self.composite = mask_aliases(self.sidecar, self.base_map, self.base.shape) if self.sidecar is not None else {}
        for mask_name in (self.sidecar.names if self.sidecar is not None else []):
            self._assign_mask(items, mask_name, base_roles, src_roles)
        return items

    def _assign_mask(self, items: dict[str, Item], mask_name: str, base_roles, src_roles) -> None:
        """The output tensor(s) one mask restores, from which BASE tensor; refused if they disagree."""
        canon = self.composite.get(mask_name) or self.rules.canonical(mask_name)
        role = self.sidecar.roles.get(mask_name)
        if canon not in self.base_map:
            probed = (self.sidecar.metadata.get("base_model") or {}).get("id")
            on = f" (it was probed on {probed})" if probed else ""
            return self._refuse(mask_name, f"{self.sidecar.path}: masks {mask_name!r}, which BASE does not have{on}")
        base_name = self.base_map.to_checkpoint(canon)
        if role and base_roles.of(role) != base_name:
            raise DowserError(f"{self.sidecar.path}: {mask_name!r} is recorded as the mask of the {role}, but "
                              f"BASE's {role} is {base_roles.of(role)!r}: was it probed on another model?")
        mask_shape, base_shape = self.sidecar.shapes[mask_name], tuple(self.base.shape(base_name))
        if mask_shape != base_shape:
            return self._refuse(mask_name, f"{self.sidecar.path}: {mask_name!r} has shape {list(mask_shape)} in the "
                                           f"mask but {list(base_shape)} in BASE")
        if role:
            targets = src_roles[role]  # the tensor(s) playing that role in FT, whatever their names
            if not targets:
                raise DowserError(f"{self.ft.where}: has no {role.replace('_', ' ')}, which {mask_name!r} masks")
        elif canon in self.src_map:
            targets = [self.src_map.to_checkpoint(canon)]
        else:
            refuse_fused_experts(self, mask_name)
            raise DowserError(f"{self.ft.where}: has no tensor for {mask_name!r}, which the mask covers")
        for target in targets:
            item = items[target]
            if item.base_name not in (None, base_name):
                raise DowserError(f"{mask_name!r} and {item.mask_names[0]!r} restore one fine-tuned tensor "
                                  f"{item.name!r} from different BASE tensors")
            check_shapes(item, base_shape)
            check_float(item, TORCH_TO_ST[self.base.dtype(base_name)], self.sidecar.path)
            item.base_name = base_name
            item.mask_names.append(mask_name)

    def _pair_items(self, items: dict[str, Item]) -> None:
        """Each output tensor's BASE counterpart (same canonical name and shape, floating point), which
        --interpolate blends with it."""
        for item in items.values():
            canon = self.src_map.to_canonical(item.name)
            if canon in self.base_map and item.dtype in FLOAT_DTYPES:
                base_name = self.base_map.to_checkpoint(canon)
                if tuple(self.base.shape(base_name)) == item.shape and TORCH_TO_ST[self.base.dtype(base_name)] in FLOAT_DTYPES:
                    item.pair = base_name

    # ---- layout ---------------------------------------------------------
    def raw(self, item: Item, alpha: float | None) -> bool:
        """Whether a tensor goes out as its source bytes, undecoded."""
        entry = self.src.ref(item.name).entry
        blended = alpha is not None and item.pair is not None
        return entry is not None and not item.mask_names and not item.adapted and entry.dtype == item.dtype and not blended

    def copyable_shard(self, file: str, names: list[str], alpha: float | None) -> str | None:
        """The source shard to copy byte for byte into `file`, if nothing in it changes."""
        if self.shard_size is not None or self.dequant is not None:  # (a shard may hold scales the output drops)
            return None
        src_file = self.src.ref(names[0]).file
        if src_file != file:  # a pickled shard becomes safetensors
            return None
        return src_file if all(self.raw(self.items[n], alpha) for n in names) else None

    # ---- strengths ------------------------------------------------------
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

    def recut(self, restore: float | None) -> bool:
        """Whether masks are re-cut at this strength. At the sidecar's own strength its stored masks
        are the ones to apply (the ones trained with, and re-cutting costs more than the I/O)."""
        return not (restore is None or (self.own_restore is not None and abs(restore - self.own_restore) < 1e-9))

    # ---- explaining -----------------------------------------------------
    def explain(self, dest: Path, restore: float | None, alpha: float | None = None) -> PlanListing:
        """What one output would hold, tensor by tensor, without reading or writing a value."""
        return PlanListing.of(self, Path(dest), restore, alpha)


@dataclass
class PlanListing:
    """One output as planned (`dowser merge --dry-run`): each tensor, in file order, as (action, name, how)
    with action restored, interpolated, adapted or copied; and the masks refused (with --force)."""

    out: Path
    strength: str
    rows: list[tuple[str, str, str]]
    refused: list[tuple[str, str]]
    shards_copied: int

    @classmethod
    def of(cls, plan: MergePlan, dest: Path, restore: float | None, alpha: float | None) -> PlanListing:
        """One output of `plan`, at strength `restore` or interpolation weight `alpha`."""
        if alpha is not None:
            strength = f"interpolate {alpha:g}"
        elif restore is None:
            own = plan.own_restore
            strength = "the sidecar's own mask" + (f" (restore {own:g})" if own is not None else "")
        else:
            strength = f"restore {restore:g}" + ("" if plan.recut(restore) else " (the sidecar's own mask)")
        source = "BASE" if plan.adapter else "FT"
        rows = []
        for file, names in plan.layout:
            for name in names:
                item = plan.items[name]
                if alpha is not None and item.pair is not None:
                    action, how = "interpolated", f"BASE + {alpha:g} (FT - BASE)"
                elif alpha is None and item.mask_names:
                    action, how = "restored", f"{strength} from BASE {item.base_name}"
                elif item.adapted:
                    action, how = "adapted", "BASE with the adapter's update"
                elif plan.dequant is not None and name in plan.dequant.weights:
                    action, how = "dequantized", f"from FT's {plan.dequant.scheme} codes and scales as {item.dtype}"
                else:
                    action, how = "copied", f"from {source}" + ("" if plan.raw(item, alpha) else f" as {item.dtype}")
                rows.append((action, name, f"{how}; {file}"))
        copied_shards = sum(plan.copyable_shard(f, ns, alpha) is not None for f, ns in plan.layout)
        return cls(dest, strength, rows, list(plan.refused), copied_shards)

    def count(self, action: str) -> int:
        return sum(row[0] == action for row in self.rows)

    def line(self) -> str:
        counts = ", ".join(f"{self.count(a)} {a}" for a in ("restored", "interpolated", "adapted", "dequantized", "copied")
                           if self.count(a) or a in ("restored", "copied"))
        head = (f"dry run: {self.out} ({self.strength}) would hold {len(self.rows)} tensors: {counts}, "
                f"{len(self.refused)} refused ({self.shards_copied} shards copied unchanged); nothing written")
        width = max([len(a) for a, _, _ in self.rows] + [len("refused")])
        lines = [head] + [f"  {a:<{width}}  {name}  ({how})" for a, name, how in self.rows]
        lines += [f"  {'refused':<{width}}  {name}  ({why})" for name, why in self.refused]
        return "\n".join(lines)
