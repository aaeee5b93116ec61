"""Outputs appear whole or not at all.

Everything is written under a temporary name beside its destination and renamed
into place at the end; on any error, Ctrl-C or SIGTERM the temporary is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

from ..errors import DowserError


def check_destination(dest: str | os.PathLike, force: bool, inputs=()) -> Path:
    """Refuse to overwrite without --force and to write inside (or over) an input folder."""
    dest = Path(dest).expanduser().absolute()
    for src in inputs:
        if src is None:
            continue
        src = Path(src).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        d = dest.resolve() if dest.exists() else dest.parent.resolve() / dest.name
        if d == src or src in d.parents or d in src.parents:
            raise DowserError(f"{dest}: output must not be inside, or contain, the input {src}")
    if dest.exists() and not force:
        raise DowserError(f"{dest}: already exists (pass --force to overwrite)")
    if not dest.parent.is_dir():
        raise DowserError(f"{dest.parent}: output folder does not exist")
    if not os.access(dest.parent, os.W_OK):
        raise DowserError(f"{dest.parent}: output folder is not writable")
    return dest


def sigterm_as_interrupt(signum, frame):
    """A SIGTERM handler that raises KeyboardInterrupt, so `finally` blocks clean up temporaries."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt inside the block (library callers; the CLI sets it for the whole run)."""
    try:
        previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _umask() -> int:
    """The process's file-mode creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike):
    """Yield a temporary path beside `dest`; rename it to `dest` when the block succeeds."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it private)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _terminate_as_interrupt():
            yield tmp
            os.replace(tmp, dest)
    except OSError as e:
        raise DowserError(f"{dest}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike):
    """Yield a temporary folder beside `dest`; it replaces `dest` when the block succeeds."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would create it (mkdtemp makes it private)
    try:
        with _terminate_as_interrupt():
            yield tmp
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
    except OSError as e:
        raise DowserError(f"{dest}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks (records name the sidecar they used by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
