"""Finding a sidecar: a local file or folder, or a Hub reference (`REPO_ID`, `REPO_ID/FILE`), turned
into a local file (`resolve_sidecar`). Imports neither torch nor transformers, so `dowser inspect`
starts at once; `file.py` re-exports `resolve_sidecar`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DowserError
from .header import SUFFIX


def resolve_sidecar(ref: str | os.PathLike, revision: str | None = None) -> Path:
    """The local file a sidecar reference names; the one place where sidecars are found.

    `ref` is, in this order:
    - an existing local file: returned as it is (a local path always wins over the Hub);
    - an existing local folder holding exactly one `*.dowser.safetensors` (at any depth);
    - a Hub model repo `REPO_ID` ("org/name"): its single `*.dowser.safetensors` file;
    - `REPO_ID/FILE`: the file FILE (a path inside the repo) of that repo.
    `revision` (branch, tag or commit) pins a Hub repo; it is refused for local paths.

    Hub files are listed with `HfApi.model_info` (the file list at the commit the revision
    resolves to) and downloaded with `hf_hub_download` at that commit into the standard HF
    cache (HF_HUB_CACHE / HF_HOME, HF_ENDPOINT and HF_TOKEN honoured). With HF_HUB_OFFLINE=1
    nothing is requested: the cached snapshot of the revision (`snapshot_download(...,
    local_files_only=True)`) is read instead, so a sidecar downloaded once keeps working
    offline. Raises DowserError (one line) when nothing matches, when a repo holds no sidecar
    or several (listed), or when the Hub cannot be reached.
    """
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.exists():
        if revision:
            raise DowserError(f"{text}: a revision applies to Hub sidecars, not to local files")
        if path.is_dir():
            files = sorted(str(p.relative_to(path)) for p in path.rglob(f"*{SUFFIX}") if p.is_file())
            if not files:
                raise DowserError(f"{text}: no such file: it is a folder, and holds no *{SUFFIX} file")
            return path / _single_sidecar(files, text, text.rstrip("/"))
        return path
    repo_id, filename = _hub_reference(text)
    where = text + (f"@{revision}" if revision else "")
    from ..io.checkpoint import _HubFiles, hub_cache_dir, hub_model_info, hub_offline

    if hub_offline():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                            cache_dir=hub_cache_dir()))
        except Exception:
            raise DowserError(f"{where}: no such local file, and HF_HUB_OFFLINE is set but {repo_id}"
                              f"{' at ' + revision if revision else ''} is not in the HF cache") from None
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        name = filename or _single_sidecar(files, f"{where} (HF cache, offline)", repo_id)
        if name not in files:
            raise DowserError(f"{where}: HF_HUB_OFFLINE is set and {name} of {repo_id} is not in the HF cache")
        return folder / name
    info = hub_model_info(repo_id, revision, where, f"no such local file, and no repo {repo_id}",
                          "; set HF_HUB_OFFLINE=1 to use the HF cache")
    files = sorted(s.rfilename for s in (info.siblings or []))
    at = f"{repo_id}@{info.sha[:12]}"
    name = filename or _single_sidecar(files, at, repo_id)
    if name not in files:
        found = [f for f in files if f.endswith(SUFFIX)]
        raise DowserError(f"{where}: {at} has no file {name!r} (its sidecars: {', '.join(found) or 'none'})")
    return _HubFiles(repo_id, info.sha, files, True, revision).path(name)


def _hub_reference(text: str) -> tuple[str, str | None]:
    """`org/name` -> (repo id, None); `org/name/FILE` -> (repo id, FILE); else "no such file".
    A two-part reference that ends in `.safetensors` is a missing local file, not a repo."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    parts = text.split("/")
    local = (text.startswith((".", "/", "~")) or "\\" in text or len(parts) < 2 or not all(parts)
             or (len(parts) == 2 and text.endswith(".safetensors")))
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if not local:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            local = True
    if local:
        raise DowserError(f"{text}: no such file")
    return repo_id, filename


def _single_sidecar(files: list[str], where: str, prefix: str) -> str:
    """The one `*.dowser.safetensors` among `files` (relative names); DowserError for none or several
    (naming them as `prefix/FILE`, the reference that picks one)."""
    found = [f for f in files if f.endswith(SUFFIX)]
    if len(found) == 1:
        return found[0]
    if not found:
        shown = ", ".join(files[:5]) + (f", ... ({len(files)} files)" if len(files) > 5 else "")
        raise DowserError(f"{where}: holds no *{SUFFIX} file ({shown or 'no files'})")
    raise DowserError(f"{where}: holds {len(found)} sidecars ({', '.join(found)}); name one, "
                      f"e.g. {prefix}/{found[0]}")
