"""Checkpoint access: one tensor (or one block) at a time, from a folder or the Hub.

A `Checkpoint` lists tensor names, dtypes and shapes from headers alone and
reads tensors lazily:
- local folders: validated headers, then memory-mapped reads with `safe_open`;
- Hub repos: the revision is resolved to a commit sha once, headers and tensors
  are fetched with HTTP range requests against that sha (adjacent tensors of a
  block in one request), so reading one block never downloads the checkpoint.
  `download=True` instead fetches whole shards into the standard HF cache with
  `hf_hub_download`; `HF_HUB_OFFLINE=1` reads the cache only.
PyTorch pickles are refused unless `allow_pickle=True` (then `weights_only=True`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import DowserError, reason
from .layout import Header, TensorEntry, parse_header, parse_header_length, read_header, tensor_from_bytes

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
# Ranges closer than this are fetched in one request (the gap is cheaper than a round trip).
COALESCE_GAP = 1 << 20
_FIRST_READ = 1 << 16  # most headers fit; one request gives header length, header and file size


@dataclass(frozen=True)
class TensorRef:
    file: str  # path relative to the checkpoint root
    entry: TensorEntry | None  # None for pickled tensors
    key: str = ""  # the tensor's name inside `file` (the checkpoint name without a component prefix)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> str:
    """The HF hub cache, read from the environment at call time (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ).upper() in ("1", "ON", "YES", "TRUE")


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class _LocalFiles:
    def __init__(self, root: Path):
        self.root = root

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def path(self, name: str) -> Path:
        return self.root / name

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with open(self.root / name, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def header(self, name: str) -> Header:
        return read_header(self.root / name)

    def list(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


class _HubFiles:
    """A repo at one commit, read by byte ranges (or whole files into the HF cache)."""

    def __init__(self, repo_id: str, sha: str, files: list[str], download: bool, revision: str | None):
        self.repo_id, self.sha, self.files, self.download = repo_id, sha, files, download
        self.revision = revision or "main"
        self.endpoint = hub_endpoint()
        self._local: dict[str, Path] = {}
        self.bytes_read = 0

    def exists(self, name: str) -> bool:
        return name in self.files

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=self.sha, endpoint=self.endpoint)

    def path(self, name: str) -> Path:
        """Whole file in the standard HF cache (downloaded once)."""
        if name not in self._local:
            from huggingface_hub import hf_hub_download

            try:
                p = hf_hub_download(
                    self.repo_id, name, revision=self.sha, endpoint=self.endpoint, cache_dir=hub_cache_dir()
                )
            except Exception as e:  # network and HTTP errors all mean the same to the user
                raise DowserError(f"{self.repo_id}/{name}@{self.sha[:12]}: download failed ({reason(e)})") from None
            self._local[name] = Path(p)
            self._record_ref()
        return self._local[name]

    def _record_ref(self) -> None:
        """Note revision -> sha in the cache (as hf_hub_download does for names) so HF_HUB_OFFLINE finds it."""
        from huggingface_hub.file_download import repo_folder_name

        if self.revision == self.sha:
            return
        ref = Path(hub_cache_dir()) / repo_folder_name(repo_id=self.repo_id, repo_type="model") / "refs" / self.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(self.sha)

    def read_range(self, name: str, start: int, end: int, want_size: bool = False):
        if self.download or name in self._local:
            data = _LocalFiles(self.path(name).parent).read_range(self.path(name).name, start, end)
            return (data, os.path.getsize(self.path(name))) if want_size else data
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers

        headers = build_hf_headers()
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"
        where = f"{self.repo_id}/{name}@{self.sha[:12]}"
        try:
            r = get_session().get(self.url(name), headers=headers, follow_redirects=True)
        except Exception as e:
            raise DowserError(f"{where}: ranged read failed ({reason(e)})") from None
        if r.status_code not in (200, 206):
            raise DowserError(f"{where}: ranged read failed (HTTP {r.status_code})")
        data = r.content
        if r.status_code == 200:  # server ignored the range: keep only what was asked
            total = len(data)
            data = data[start:end]
        else:
            total = int(r.headers.get("Content-Range", "*/0").rsplit("/", 1)[-1] or 0)
        self.bytes_read += len(data)
        return (data, total) if want_size else data

    def header(self, name: str) -> Header:
        where = f"{self.repo_id}/{name}@{self.sha[:12]}"
        first, size = self.read_range(name, 0, _FIRST_READ, want_size=True)
        n = parse_header_length(first, where)
        if 8 + n > size:
            raise DowserError(f"{where}: truncated: header claims {n} bytes, file has {size}")
        raw = first[8 : 8 + n] if len(first) >= 8 + n else self.read_range(name, 8, 8 + n)
        return parse_header(raw, size, where)

    def list(self) -> list[str]:
        return list(self.files)


class Checkpoint:
    """Lazy, read-only access to the tensors and files of one model checkpoint."""

    def __init__(self, source: str, files, revision: str | None, sha: str | None, allow_pickle: bool):
        self.source = source
        self.revision = revision
        self.sha = sha
        self.is_remote = isinstance(files, _HubFiles)
        self._files = files
        self._handles: dict[str, object] = {}  # loaded pickles (memory-mapped), by file
        self.index: str | None = None  # the index file the weights were found through, if any
        self.config: dict | None = self._json("config.json")
        self.weight_files, self._refs = self._index_weights(allow_pickle)

    # ---- description -------------------------------------------------
    def __repr__(self) -> str:
        at = f"@{self.sha[:12]}" if self.sha else ""
        return f"Checkpoint({self.source}{at}, {len(self._refs)} tensors)"

    @property
    def where(self) -> str:
        return self.source + (f"@{self.revision}" if self.revision else "")

    def tensor_names(self) -> list[str]:
        return list(self._refs)

    def __contains__(self, name: str) -> bool:
        return name in self._refs

    def ref(self, name: str) -> TensorRef:
        try:
            return self._refs[name]
        except KeyError:
            raise DowserError(f"{self.where}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        ref = self.ref(name)
        return ref.entry.shape if ref.entry else tuple(self._pickled(ref.file)[ref.key].shape)

    def dtype(self, name: str) -> torch.dtype:
        ref = self.ref(name)
        return ref.entry.torch_dtype if ref.entry else self._pickled(ref.file)[ref.key].dtype

    def files(self) -> list[str]:
        """Every file of the checkpoint (relative names)."""
        return self._files.list()

    def file_path(self, name: str) -> Path:
        """A local path to one file (downloaded into the HF cache for Hub checkpoints)."""
        if not self._files.exists(name):
            raise DowserError(f"{self.where}: no file {name!r}")
        return self._files.path(name)

    def header(self, file: str) -> Header:
        return self._files.header(file)

    @property
    def bytes_read(self) -> int:
        """Bytes fetched over HTTP so far (0 for local checkpoints)."""
        return getattr(self._files, "bytes_read", 0)

    # ---- reading -----------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        return self.read_many([name])[name]

    def read_many(self, names, gap: int = COALESCE_GAP) -> dict[str, torch.Tensor]:
        """Read several tensors; on the Hub, ones closer than `gap` bytes come in one ranged request
        (gap 0: only adjacent ones, so that no byte outside the tensors is transferred)."""
        names = list(names)
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[TensorEntry]] = {}
        mapped: dict[str, list[str]] = {}
        name_of: dict[tuple[str, str], str] = {}  # (file, key inside it) -> checkpoint name
        for name in names:
            ref = self.ref(name)
            name_of[(ref.file, ref.key)] = name
            if ref.entry is None:
                out[name] = self._pickled(ref.file)[ref.key]
            elif self.is_remote and not self._files.download:
                by_file.setdefault(ref.file, []).append(ref.entry)
            else:
                mapped.setdefault(ref.file, []).append(ref.key)
        for file, keys in mapped.items():
            # Map the file only for this read: a mapping kept open would leave every page the
            # probe ever touched resident, and memory must stay near one block.
            from safetensors import safe_open

            with safe_open(str(self._files.path(file)), framework="pt", device="cpu") as f:
                for key in keys:
                    out[name_of[(file, key)]] = f.get_tensor(key)
        for file, entries in by_file.items():
            for start, end, group in _coalesce(entries, gap):
                buf = memoryview(self._files.read_range(file, start, end))
                if len(buf) != end - start:
                    raise DowserError(f"{self.where}/{file}: truncated: wanted {end - start} bytes, got {len(buf)}")
                for e in group:
                    out[name_of[(file, e.name)]] = tensor_from_bytes(buf[e.start - start : e.end - start], e)
        return {n: out[n] for n in names}

    def read_bytes(self, file: str, start: int, end: int) -> bytes:
        return self._files.read_range(file, start, end)

    def read_text(self, name: str) -> str | None:
        if not self._files.exists(name):
            return None
        return Path(self._files.path(name)).read_text(encoding="utf-8")

    def close(self) -> None:
        self._handles.clear()

    # ---- internals ---------------------------------------------------
    def _json(self, name: str) -> dict | None:
        text = self.read_text(name) if self._files.exists(name) else None
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DowserError(f"{self.where}/{name}: not valid JSON ({e.msg} at line {e.lineno})") from None

    def _weight_source(self, folder: str = "") -> tuple[str, bool] | None:
        """The file transformers (or peft, for an adapter folder) would load, and whether it is an index.

        transformers 5 (`modeling_utils._get_resolved_checkpoint_files`): model.safetensors, then
        model.safetensors.index.json, then pytorch_model.bin, then its index; peft reads
        adapter_model.safetensors, then adapter_model.bin. A folder holding both an adapter and full
        model weights is refused: which one a user means cannot be told from the files.
        `folder` ('' or 'llm/'): where to look, relative to the checkpoint root.
        """
        f = self._files
        model = [(folder + n, n.endswith(".json")) for n in ("model.safetensors", SAFETENSORS_INDEX,
                                                              "pytorch_model.bin", PICKLE_INDEX) if f.exists(folder + n)]
        adapter = [(folder + n, False) for n in ("adapter_model.safetensors", "adapter_model.bin")
                   if f.exists(folder + n)]
        if f.exists(folder + ADAPTER_CONFIG) and model:
            raise DowserError(
                f"{self.where}: holds both a LoRA adapter ({ADAPTER_CONFIG}) and full model weights ({model[0][0]}); "
                "keep one of them in the folder"
            )
        found = model or adapter
        return found[0] if found else None

    def components(self) -> list[str]:
        """Sub-models stored in folders of their own, named by `<name>_cfg` entries of the root config
        (VILA/NVILA: llm/, vision_tower/, mm_projector/), when the root holds no weights itself.
        Their tensors are named `<name>.<key>`. Empty for an ordinary checkpoint."""
        config = self.config or {}
        if self._weight_source() is not None:
            return []
        names = [k[: -len("_cfg")] for k, v in config.items() if k.endswith("_cfg") and isinstance(v, (dict, str))]
        return [n for n in names if self._weight_source(f"{n}/") is not None]

    def _index_weights(self, allow_pickle: bool):
        folders = [f"{c}/" for c in self.components()] or [""]
        files, refs, self.indexes = [], {}, {}
        for folder in folders:
            source = self._weight_source(folder)
            if source is None:
                raise DowserError(
                    f"{self.where}: no model weights found (expected model.safetensors, {SAFETENSORS_INDEX}, "
                    "adapter_model.safetensors or pytorch_model.bin)"
                )
            folder_files, folder_refs = self._index_folder(folder, source, allow_pickle)
            files += folder_files
            refs.update(folder_refs)
        self.index = self.indexes.get("")
        return files, refs

    def _index_folder(self, folder: str, source: tuple[str, bool], allow_pickle: bool):
        """Weight files and tensor refs of one folder ('' for the root); names get the folder as prefix."""
        name, is_index = source
        if is_index:
            self.indexes[folder] = name
        weight_map = {k: folder + v for k, v in self._weight_map(name).items()} if is_index else None
        files = sorted(set(weight_map.values())) if is_index else [name]
        prefix = folder.replace("/", ".")
        refs: dict[str, TensorRef] = {}
        if not name.endswith((".bin", PICKLE_INDEX)):
            for shard in files:
                for tensor, entry in self._files.header(shard).tensors.items():
                    if prefix + tensor in refs:
                        raise DowserError(f"{self.where}: tensor {tensor!r} appears in {refs[prefix + tensor].file} and {shard}")
                    refs[prefix + tensor] = TensorRef(shard, entry, tensor)
        else:
            if not allow_pickle:
                raise DowserError(
                    f"{self.where}: weights are PyTorch pickles ({files[0]}), which can run code when loaded; "
                    "convert them to safetensors or pass --allow-pickle to load them with weights_only=True"
                )
            for shard in files:
                for tensor in self._pickled(shard):
                    if prefix + tensor in refs:
                        raise DowserError(f"{self.where}: tensor {tensor!r} appears in {refs[prefix + tensor].file} and {shard}")
                    refs[prefix + tensor] = TensorRef(shard, None, tensor)
        if weight_map is not None:
            self._check_index(name, weight_map, {r.key: r for r in refs.values()})
        return files, refs

    def _check_index(self, index_name: str, weight_map: dict, refs: dict[str, TensorRef]) -> None:
        """The index must name exactly the tensors the shards hold, each in its own shard."""
        for tensor in sorted(set(weight_map) | set(refs)):
            listed, held = weight_map.get(tensor), refs[tensor].file if tensor in refs else None
            if listed != held:
                problem = (f"lists {tensor!r} in {listed}, which does not hold it" if held is None else
                           f"does not list {tensor!r}, which {held} holds" if listed is None else
                           f"lists {tensor!r} in {listed}, but {held} holds it")
                raise DowserError(f"{self.where}/{index_name}: {problem}; the index and its shards disagree")

    def _weight_map(self, index_name: str) -> dict[str, str]:
        index = self._json(index_name)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise DowserError(f"{self.where}/{index_name}: no weight_map")
        folder = index_name.rpartition("/")[0]
        for shard in sorted(set(weight_map.values())):
            if not self._files.exists(f"{folder}/{shard}" if folder else shard):
                raise DowserError(f"{self.where}/{index_name}: names shard {shard!r}, which is missing")
        return weight_map

    def _pickled(self, file: str) -> dict:
        if file not in self._handles:
            import torch

            try:
                sd = torch.load(str(self._files.path(file)), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise DowserError(f"{self.where}/{file}: cannot load pickle with weights_only=True ({reason(e)})") from None
            if not isinstance(sd, dict):
                raise DowserError(f"{self.where}/{file}: pickle does not hold a state dict")
            self._handles[file] = sd
        return self._handles[file]


@functools.cache
def _same_size_int() -> dict:
    import torch

    # A dtype's bits as an integer type of the same width (bitwise comparison and selection).
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def __getattr__(name):
    # torch is imported where a tensor is made, not here, so that finding files (`resolve_sidecar`,
    # `dowser inspect`) stays torch-free. SAME_SIZE_INT needs torch: built on first access.
    if name == "SAME_SIZE_INT":
        return _same_size_int()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    import torch

    if a.dtype == torch.bool:
        return torch.equal(a, b)
    as_int = _same_size_int()[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def _coalesce(entries: list[TensorEntry], gap: int = COALESCE_GAP):
    """Group entries of one file into ranges; entries closer than `gap` bytes share a request."""
    entries = sorted(entries, key=lambda e: e.start)
    groups: list[tuple[int, int, list[TensorEntry]]] = []
    for e in entries:
        if groups and e.start - groups[-1][1] <= gap:
            start, end, members = groups[-1]
            groups[-1] = (start, max(end, e.end), members + [e])
        else:
            groups.append((e.start, e.end, [e]))
    return groups


def open_checkpoint(
    source: str | os.PathLike,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    download: bool = False,
) -> Checkpoint:
    """Open a local folder or a Hub repo id (at `revision`: branch, tag or commit)."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            raise DowserError(f"{source}: --revision applies to Hub repos, not local folders")
        return Checkpoint(str(path), _LocalFiles(path), None, None, allow_pickle)
    if path.exists():
        raise DowserError(f"{source}: is a file; pass the checkpoint folder")
    if not _REPO_ID.match(source) or source.startswith((".", "/", "~")):
        raise DowserError(f"{source}: no such folder")
    return _open_hub(source, revision, allow_pickle, download)


def hub_model_info(repo_id: str, revision: str | None, where: str, missing: str, hint: str = ""):
    """`HfApi.model_info` of a repo at a revision (resolved commit and file list), at HF_ENDPOINT.

    Raises DowserError (one line, starting with `where`): an unknown revision, a missing or private
    repo (`missing` says what was looked for), an unreachable endpoint (`hint` added).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    endpoint = hub_endpoint()
    try:
        return HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)
    except RevisionNotFoundError:
        of = "" if where == repo_id else f" of {repo_id}"
        raise DowserError(f"{where}: revision {revision!r}{of} does not exist") from None
    except RepositoryNotFoundError:
        raise DowserError(f"{where}: {missing} on {endpoint} (or it is private)") from None
    except Exception as e:
        raise DowserError(f"{where}: cannot reach {endpoint} ({reason(e)}){hint}") from None


def _open_hub(repo_id: str, revision: str | None, allow_pickle: bool, download: bool) -> Checkpoint:
    from huggingface_hub import snapshot_download

    if hub_offline():
        try:
            folder = Path(
                snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=hub_cache_dir())
            )
        except Exception:
            raise DowserError(
                f"{repo_id}: not a local folder, and HF_HUB_OFFLINE is set but the repo"
                f"{' at ' + revision if revision else ''} is not in the HF cache"
            ) from None
        return Checkpoint(repo_id, _LocalFiles(folder), revision, folder.name, allow_pickle)
    info = hub_model_info(repo_id, revision, repo_id, "no such local folder, and no such repo",
                          hint=f"; and there is no local folder {repo_id!r}")
    files = [s.rfilename for s in (info.siblings or [])]
    return Checkpoint(repo_id, _HubFiles(repo_id, info.sha, files, download, revision), revision, info.sha, allow_pickle)
