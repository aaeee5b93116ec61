"""Interchange with the released Model-Dowser scripts' per-module score files (docs/INTERCHANGE.md).

The authors' importance scripts (`LLaVA/scripts/llava_importance_self_gen_prompt.py`,
`VILA/scripts/importance_self_gen_prompt.py` in nguyendinhson-kaist/Model-Dowser) write one
`torch.save` pickle per scored module, `{name.replace('.', '_')}.pt`, holding a dict:

    name                    str      the module's name in their scheme (below)
    importance_matrix_mean  Tensor   (out, in), bf16 by default: the weighted mean over
                                     updates of psi_u |W| a_u^T (the score)
    importance_matrix_std   Tensor   (out, in): the weighted standard deviation of the same
    W_shape                 torch.Size  the weight's shape
    W_fro                   float    the weight's Frobenius norm
    num_samples             int      the summed update weights (K probes x M draws)

Names: `llm.{i}.{path in decoder layer i}` (e.g. `llm.0.self_attn.q_proj`), `lm_head`,
`proj.{name inside the projector}` and `vision.{name inside the vision tower}`. Their
training script (`train_dowser.py`, `_load_importance_tensors`) globs `*.pt`, keys each by
file name and reads `importance_matrix_mean`.

`import_scores` reads such a folder (with `torch.load(weights_only=True)` only, every value
checked to be a plain tensor, number, string or size), maps each module to the base
checkpoint's tensor through the base's anatomy (`anatomy.Anatomy`: the decoder layers, the
head, the vision tower and the projector as transformers builds the model), and writes a
sidecar holding the masks cut at an update ratio and the mean scores themselves
(`score/<name>`), from which masks are re-cut. `export_scores` writes the same layout from a
sidecar, so the authors' training script can consume this tool's probe.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..model.anatomy import Anatomy, Weight, _is_linear
from ..model.experts import is_stack
from ..model.keys import KeyRules, NameMap, natural_key
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..errors import DowserError, reason
from ..io.outputs import atomic_dir, check_destination
from ..score import cut_mask, validate_ratio
from ..sidecar.file import OUTPUT_HEAD, PackedMask, Sidecar, SidecarData, write_sidecar

RELEASED_FORMAT = "Model-Dowser released scripts (per-module .pt)"
MEAN, STD = "importance_matrix_mean", "importance_matrix_std"
# Score dtypes the scripts save (`--save-dtype bf16|fp16|fp32`); kept as they are in the sidecar.
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# |W_fro in the file / W_fro of BASE - 1| above this: the scores were computed on other weights.
# The scripts compute the norm in the model's dtype (bf16 on GPU): relative error below 2^-8.
FRO_TOLERANCE = 1e-2


def released_file_name(name: str) -> str:
    """The file the released scripts save module `name` to: dots become underscores, `.pt`."""
    return name.replace(".", "_") + ".pt"


@dataclass
class ScoreFile:
    """One released per-module score file, read and checked.

    name: the module name in the released scheme; mean: the score (out, in) in the file's
    dtype (float32, bfloat16 or float16); std: its standard deviation or None; w_shape,
    w_fro, num_samples: as the file records them (None when absent).
    """

    path: Path
    name: str
    mean: torch.Tensor
    std: torch.Tensor | None
    w_shape: tuple[int, ...]
    w_fro: float | None
    num_samples: int | None


def read_score_file(path: str | os.PathLike) -> ScoreFile:
    """Read one released score file with `torch.load(weights_only=True)` (no code runs) and check
    it: a dict whose values are plain tensors (strided, float32/bfloat16/float16 for the scores),
    numbers, strings or sizes; `name` and `importance_matrix_mean` present; the shapes of mean,
    std and `W_shape` equal; the file named as the scripts name it. DowserError (one line) otherwise.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            _refuse(path, e)
        obj = _load_plain(path)  # an old (non-zip) torch.save file cannot be memory-mapped: read it whole
    except Exception as e:  # the weights-only unpickler refuses anything but plain data
        _refuse(path, e)
    if type(obj) not in (dict, OrderedDict):
        raise DowserError(f"{path}: refused: holds a {type(obj).__name__}, not a dict of scores")
    for key, value in obj.items():
        if not isinstance(key, str) or not _plain(value):
            raise DowserError(f"{path}: refused: entry {key!r} is a {type(value).__name__}, not a plain tensor, "
                              "number, string or size")
    name, mean, std = obj.get("name"), obj.get(MEAN), obj.get(STD)
    if not isinstance(name, str) or not name:
        raise DowserError(f"{path}: no module name ('name')")
    if path.name != released_file_name(name):
        raise DowserError(f"{path}: holds the scores of {name!r}, which the released scripts save as "
                          f"{released_file_name(name)}; the file name and its contents disagree")
    if not isinstance(mean, torch.Tensor) or mean.dim() != 2 or mean.dtype not in SCORE_DTYPES:
        raise DowserError(f"{path}: {MEAN!r} must be a 2-D float32, bfloat16 or float16 tensor")
    if not bool(torch.isfinite(mean).all()):
        raise DowserError(f"{path}: {MEAN!r} holds NaN or infinite scores")
    shape = tuple(mean.shape)
    if std is not None and (not isinstance(std, torch.Tensor) or tuple(std.shape) != shape):
        raise DowserError(f"{path}: {STD!r} is not a tensor of the mean's shape {list(shape)}")
    w_shape = obj.get("W_shape", shape)
    if not isinstance(w_shape, (tuple, list)) or tuple(w_shape) != shape:
        raise DowserError(f"{path}: W_shape {list(w_shape) if isinstance(w_shape, (tuple, list)) else w_shape!r} differs from the scores' shape {list(shape)}")
    w_fro, num_samples = obj.get("W_fro"), obj.get("num_samples")
    if w_fro is not None and (isinstance(w_fro, bool) or not isinstance(w_fro, (int, float)) or not w_fro >= 0):
        raise DowserError(f"{path}: W_fro must be a non-negative number, got {w_fro!r}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise DowserError(f"{path}: num_samples must be a positive integer, got {num_samples!r}")
    return ScoreFile(path, name, mean, std, shape, None if w_fro is None else float(w_fro), num_samples)


def _load_plain(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        _refuse(path, e)


def _refuse(path: Path, e: Exception):
    """One line for torch.load's refusal: the paragraph of its message that says why (the GLOBAL it
    blocked, a bad load key), without the advice to retry with weights_only=False."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    parts = [" ".join(p.split()) for p in str(e).split("\n\n") if p.strip()]
    why = next((p for p in parts if not p.startswith(boilerplate)), None) or reason(e)
    raise DowserError(f"{path}: refused: not a plain torch file of tensors, numbers and strings "
                      f"(torch.load with weights_only=True: {why})") from None


def _plain(value) -> bool:
    """A plain tensor (exactly torch.Tensor, strided, no gradient), number, string, size, or a
    tuple/list of numbers: everything else the weights-only unpickler admits (Parameters,
    dtypes, devices, Counters, nested containers) is refused."""
    if type(value) is torch.Tensor:
        return value.layout == torch.strided and not value.requires_grad
    if type(value) is torch.Size:
        return True
    if type(value) in (tuple, list):
        return all(type(v) is int for v in value)
    return type(value) in (str, int, float, bool) or value is None


# ---- names: the released scheme <-> the base checkpoint's tensors --------------------------------
class ReleasedNames:
    """The released scripts' module names of a base checkpoint's weights, from its anatomy.

    - `llm.{i}.{path in decoder layer i}`: every linear weight of decoder layer i (per-expert
      slices of fused expert parameters have no name there and are left out);
    - `lm_head`: the output head (the embedding's tensor when tied);
    - `vision.{path in the vision tower}`: every linear of the vision encoder;
    - `proj.{name inside the projector}`: the projector's linears. The scripts name them by
      their module name inside the projector, which differs between code bases (`proj.0`,
      `proj.2` for LLaVA-1.5's Sequential, `linear_1`, `linear_2` in transformers), so they
      are matched by order (checkpoint-key order here, natural order of the names there) and
      checked by shape.
    Module paths are read through transformers' own key renamings (`KeyRules.canonical`), so
    the names of older code (LLaVA-1.5's `vision_model.encoder...`) find today's modules.
    `by_key` gives the name this tool writes for each checkpoint key (current module paths,
    projector linears numbered in order).
    """

    def __init__(self, anatomy: Anatomy):
        self.anatomy = anatomy
        self.rules = KeyRules.of_model(anatomy.model)
        self.by_param: dict[str, Weight] = {}  # in-memory parameter -> weight, for llm.* and vision.*
        self.by_key: dict[str, str] = {}
        for i in range(len(anatomy.layers)):
            layer = f"{anatomy.layers_path}.{i}"
            for w in anatomy.decoder_weights(i):
                if w.expert is None and not is_stack(w):  # expert slices and 3-D stacks have no released name
                    self.by_param[w.param] = w
                    self.by_key[w.key] = f"llm.{i}.{w.module[len(layer) + 1:]}"
        self.head = anatomy.head_weight()
        vision = anatomy.vision_encoder
        if vision is not None:
            for path, mod in anatomy.model.named_modules():
                if path.startswith(f"{vision}.") and _is_linear(mod):
                    for key in anatomy.keys.sources.get(f"{path}.weight", []):
                        self.by_param[f"{path}.weight"] = Weight(key, f"{path}.weight", path, "vision", "vision")
                        self.by_key[key] = f"vision.{path[len(vision) + 1:]}"
        inside_vision = f"{vision}." if vision else None
        self.projector = [w for w in anatomy.stem_weights("projector")
                          if not (inside_vision and w.module.startswith(inside_vision))]
        self.by_key.update({w.key: f"proj.{k}" for k, w in enumerate(self.projector)})
        if self.head is not None:
            self.by_key[self.head.key] = "lm_head"

    def weight(self, name: str) -> Weight | None:
        """The base's weight of one released module name (not `proj.*`), or None."""
        if name == "lm_head":
            return self.head
        head, _, rest = name.partition(".")
        if head == "llm":
            index, _, sub = rest.partition(".")
            if not index.isdigit() or int(index) >= len(self.anatomy.layers) or not sub:
                return None
            candidate = f"{self.anatomy.layers_path}.{int(index)}.{sub}.weight"
        elif head == "vision" and self.anatomy.vision_encoder and rest:
            candidate = f"{self.anatomy.vision_encoder}.{rest}.weight"
        else:
            return None
        w = self.by_param.get(self.rules.canonical(candidate))
        return w if w is not None and (w.part == "vision") == (head == "vision") else None

    def weights_of(self, names: list[str], where: str) -> dict[str, Weight]:
        """Released name -> the base's Weight, for the names of one folder of score files."""
        out, proj = {}, sorted((n for n in names if n.startswith("proj.")), key=natural_key)
        for name in names:
            if name.startswith("proj."):
                continue
            w = self.weight(name)
            if w is None:
                raise DowserError(f"{where}: {released_file_name(name)} scores {name!r}, which BASE does not have "
                                  f"(known: llm.<layer>.<module>, lm_head, vision.<module>, proj.<module>)")
            out[name] = w
        if proj and len(proj) != len(self.projector):
            raise DowserError(f"{where}: {len(proj)} projector files ({', '.join(proj)}) but BASE's projector has "
                              f"{len(self.projector)} linear weights; they are matched in order, so the counts must agree")
        out.update(zip(proj, self.projector))
        return out


def _anatomy(ckpt: Checkpoint) -> Anatomy:
    if ckpt.config is None:
        raise DowserError(f"{ckpt.where}: no config.json (BASE must be a full model)")
    return Anatomy.of(ckpt.config, {n: ckpt.shape(n) for n in ckpt.tensor_names()}, ckpt.where)


def _base_record(ckpt: Checkpoint) -> dict:
    """What a sidecar records about its base (as `dowser probe` does): a local folder by its absolute path."""
    local = not ckpt.is_remote and ckpt.sha is None
    return {"id": str(Path(ckpt.source).resolve()) if local else ckpt.source, "revision": ckpt.revision,
            "sha": ckpt.sha}


def _tensor_info(w: Weight, released: str, num_samples: int | None) -> dict:
    info = {"part": w.part, "kind": w.kind, "layer": w.layer, "layout": "in_out" if w.transposed else "out_in",
            "released_name": released}
    if num_samples is not None:
        info["num_samples"] = num_samples
    return info


# ---- import ---------------------------------------------------------------------------------------
def import_scores(folder: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
                  update_ratio: float = 0.1, base_revision: str | None = None, allow_pickle: bool = False,
                  force: bool = False) -> dict:
    """Turn a folder of the released scripts' score files into a sidecar.

    folder: the scripts' `--save-dir` (every `*.pt` in it is read, with
    `torch.load(weights_only=True)` only; `read_score_file`); base: the model they were scored
    on (folder or Hub id, at `base_revision`), whose anatomy maps each module name to a
    checkpoint tensor and whose shapes and Frobenius norms must match the files'.
    The sidecar holds, per tensor, the mask cut at `update_ratio` (exactly
    round(update_ratio * numel) trainable entries, ties by index: `scoring.cut_mask`) and the
    mean score itself (`score/<name>`, in the file's dtype), from which `dowser mask`,
    `dowser merge --restore` and `load_mask(update_ratio=...)` re-cut. The standard deviations
    are not kept. Returns a summary dict; DowserError (one line, nothing written) for any file
    that cannot be read, named, or matched to BASE.
    """
    update_ratio = validate_ratio(update_ratio)
    folder = Path(folder).expanduser()
    paths = _score_paths(folder)
    dest = check_destination(out, force, inputs=[folder, base])
    ckpt = open_checkpoint(base, base_revision, allow_pickle=allow_pickle)
    files = _read_score_files(paths, folder)
    weights = ReleasedNames(_anatomy(ckpt)).weights_of([f.name for f in files], str(folder))
    data = SidecarData(masks={}, roles={})
    info, keys = {}, {}
    for f in files:
        w = weights[f.name]
        if w.key in keys:
            raise DowserError(f"{folder}: {keys[w.key].name} and {f.path.name} both map to {w.key!r}")
        keys[w.key] = f.path
        _check_against_base(f, w, ckpt)
        data.masks[w.key] = PackedMask.of(cut_mask(f.mean.float(), update_ratio))
        data.scores[w.key] = f.mean
        if w.part == "lm_head":
            data.roles[w.key] = OUTPUT_HEAD  # also when tied: stored under the embedding's name
        info[w.key] = _tensor_info(w, f.name, f.num_samples)
    data.info = _imported_record(ckpt, folder, files, weights, update_ratio, info)
    write_sidecar(dest, data)
    numel = sum(m.numel() for m in data.masks.values())
    return {"path": str(dest), "tensors": len(files), "weights": numel,
            "protected_fraction": sum(m.protected() for m in data.masks.values()) / numel}


def _score_paths(folder: Path) -> list[Path]:
    """The `*.pt` files of the scripts' `--save-dir`, in natural order of their module names;
    DowserError for a missing folder or one without score files."""
    if not folder.is_dir():
        raise DowserError(f"{folder}: no such folder")
    paths = sorted(folder.glob("*.pt"), key=lambda p: natural_key(p.stem.replace("_", ".")))
    if not paths:
        raise DowserError(f"{folder}: holds no *.pt score files")
    return paths


def _read_score_files(paths: list[Path], folder: Path) -> list[ScoreFile]:
    """Every score file read (`read_score_file`); DowserError if two hold the scores of one module."""
    files = [read_score_file(p) for p in paths]
    seen: dict[str, Path] = {}
    for f in files:
        if f.name in seen:
            raise DowserError(f"{folder}: {seen[f.name].name} and {f.path.name} both hold the scores of {f.name!r}")
        seen[f.name] = f.path
    return files


def _check_against_base(f: ScoreFile, w: Weight, ckpt: Checkpoint) -> None:
    """DowserError unless the file was scored on BASE's tensor: same shape and, when the file
    records it, the same Frobenius norm (within FRO_TOLERANCE)."""
    base_shape = tuple(ckpt.shape(w.key))
    if f.w_shape != base_shape:
        raise DowserError(f"{f.path}: scores {f.name!r} with shape {list(f.w_shape)}, but BASE's {w.key!r} "
                          f"is {list(base_shape)}")
    if f.w_fro is not None:
        fro = _frobenius(ckpt.read(w.key))
        if abs(f.w_fro - fro) > FRO_TOLERANCE * max(fro, 1e-30):
            raise DowserError(f"{f.path}: was scored on weights of Frobenius norm {f.w_fro:.6g}, but BASE's "
                              f"{w.key!r} has {fro:.6g}: these scores are not of this BASE")


def _imported_record(ckpt: Checkpoint, folder: Path, files: list[ScoreFile], weights: dict, update_ratio: float,
                     info: dict) -> dict:
    """The sidecar's provenance for imported scores, as `dowser probe` records its own (base, method,
    settings, per-tensor info) plus where and in what format the scores came from."""
    samples = sorted({f.num_samples for f in files if f.num_samples is not None})
    parts = {w.part for w in weights.values()}
    return {
        "base_model": _base_record(ckpt),
        "architecture": (ckpt.config or {}).get("model_type"),
        "method": "dowser",
        "estimator": "reference",
        "update_ratio": update_ratio,
        "granularity": "entry",
        "layers": sorted({w.layer for w in weights.values() if w.layer is not None}),
        "include": sorted({"lm_head": "lm_head", "projector": "projector", "vision": "vision"}[p]
                          for p in parts if p != "decoder"),
        "tensor_info": info,
        "imported": {"format": RELEASED_FORMAT, "from": str(folder.resolve()), "files": len(files),
                     "num_samples": samples, "score_dtype": sorted({str(f.mean.dtype).replace("torch.", "")
                                                                     for f in files}),
                     "tool_version": __version__},
    }


# ---- export ---------------------------------------------------------------------------------------
def export_scores(sidecar, out: str | os.PathLike, *, base=None, base_revision: str | None = None,
                  revision: str | None = None, dtype: str = "float32", allow_pickle: bool = False,
                  force: bool = False) -> dict:
    """Write a sidecar's scores as the released scripts' per-module files, for their training script.

    sidecar: a file or Hub reference (at `revision`) holding statistics (psi/a) or full scores;
    base: the base model (folder, Hub id at `base_revision`, or by default the one the sidecar
    records), which gives the weights and the module names. One file per scored tensor,
    `out/{name with dots as underscores}.pt`, a dict with `name`, `importance_matrix_mean`
    (the score |W| (.) Psi^T diag(w) A / sum(w), `scoring.score_matrix`, in the weight's stored
    layout, as `dtype`), `importance_matrix_std` (the weighted standard deviation over updates
    of |W| (.) psi_u a_u^T; absent for a sidecar of imported scores, which has none), `W_shape`,
    `W_fro` and `num_samples`. The folder is written whole or not at all. Returns a summary
    dict; DowserError for a sidecar without scores or a tensor the released scheme cannot name.
    """
    if dtype not in EXPORT_DTYPES:
        raise DowserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    sc = sidecar if isinstance(sidecar, Sidecar) else Sidecar(sidecar, revision)
    if not sc.has_stats:
        raise DowserError(f"{sc.path}: holds no score statistics (probed with --no-save-stats): nothing to export")
    dest = check_destination(out, force, inputs=[sc.path])
    if base is not None:
        ckpt = open_checkpoint(base, base_revision, allow_pickle=allow_pickle)
    else:
        from ..sidecar.file import open_base

        ckpt = open_base(sc)
    names = ReleasedNames(_anatomy(ckpt))
    rules = KeyRules.of_config(ckpt.config or {}, f"{ckpt.where}/config.json")
    name_map = NameMap(ckpt.tensor_names(), rules, ckpt.where)
    plan = []
    for name in sc.names:
        key = name_map.to_checkpoint(rules.canonical(name)) if rules.canonical(name) in name_map else None
        released = names.by_key.get(key)
        if released is None:
            raise DowserError(f"{sc.path}: {name!r} has no name in the released scripts' format (they name decoder "
                              "linears, lm_head, the projector and the vision tower's linears)")
        plan.append((name, key, released))
    samples = _num_samples(sc)
    info = sc.metadata.get("tensor_info") or {}
    with atomic_dir(dest) as tmp:
        for name, key, released in plan:
            W = ckpt.read(key)
            if tuple(W.shape) != sc.shapes[name]:
                raise DowserError(f"{sc.path}: {name!r} has shape {list(sc.shapes[name])} in the sidecar but "
                                  f"{list(W.shape)} in BASE")
            record = {"name": released, MEAN: sc.score(name, W).to(EXPORT_DTYPES[dtype])}
            if sc.has_factors:
                record[STD] = _score_std(sc, name, W).to(EXPORT_DTYPES[dtype])
            record.update({"W_shape": torch.Size(W.shape), "W_fro": _frobenius(W),
                           "num_samples": samples if samples is not None else (info.get(name) or {}).get("num_samples")})
            if record["num_samples"] is None:
                del record["num_samples"]
            torch.save(record, tmp / released_file_name(released))
    return {"path": str(dest), "files": len(plan)}


def _frobenius(W: torch.Tensor) -> float:
    """||W||_F, accumulated in float32 (the scripts compute it in the model's dtype)."""
    return float(torch.linalg.vector_norm(W.float()))


def _score_std(sc: Sidecar, name: str, W: torch.Tensor) -> torch.Tensor:
    """sqrt(max(E_w[(|W| psi_u a_u^T)^2] - E_w[|W| psi_u a_u^T]^2, 0)), the released scripts' weighted
    (population) standard deviation, over this sidecar's updates (probe batches, draws already averaged).
    Both moments in float64: their difference cancels where the spread is small."""
    psi, a, w = (t.double() for t in sc.stats(name))
    w = (w / w.sum())[:, None]
    first, second = (a.T @ (psi * w), (a * a).T @ (psi * psi * w)) if sc.transposed(name) else \
        ((psi * w).T @ a, (psi * psi * w).T @ (a * a))
    Wa = W.double().abs()
    return (second * Wa * Wa - (first * Wa) ** 2).clamp_(min=0).sqrt_().float()


def _num_samples(sc: Sidecar) -> int | None:
    """The scripts' count, sum of update weights x draws (their Welford count over K probes x M draws),
    for a sidecar with statistics; None otherwise."""
    if not sc.has_factors:
        return None
    _, _, w = sc.stats(sc.names[0])
    draws = (sc.metadata.get("probe") or {}).get("draws") or 1
    return int(round(float(w.sum()) * max(int(draws), 1)))
