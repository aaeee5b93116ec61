"""The benchmark's only contact with dowser-tool: its CLI (run in-process) and public API."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def dowser(*args: str) -> None:
    """Run `dowser ARGS` in this process (saves an interpreter start per call)."""
    from dowser_tool.cli import main

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its one-line summaries would drown the log
            main.main([str(a) for a in args], standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"dowser {' '.join(map(str, args))} failed (exit {e.code})") from None


def probe(base: Path, out: Path, method: str, seed: int, ratio: float = 0.1, estimator: str = "reference",
          probes: int = 64, extra=()) -> Path:
    args = ["probe", base, "--out", out, "--method", method, "--update-ratio", ratio, "--seed", seed,
            "--probes", probes, "-q", "--force", *extra]
    if method == "dowser":
        args += ["--estimator", estimator]
    dowser(*args)
    return out


def _weights(path: Path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def write_like(ft: Path, tensors: dict, out: Path) -> Path:
    """A checkpoint folder: FT's config and tokenizer files with `tensors` as the weights."""
    shutil.copytree(ft, out, dirs_exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def repair(base: Path, ft: Path, sidecar: Path, restore: float | None, out: Path) -> Path:
    """`dowser merge`: restore the fraction `restore` of each scored matrix (highest scores) from BASE.

    restore=None applies the sidecar's own mask (random masks keep no statistics, so they are
    probed at update ratio 1 - restore instead).
    """
    args = ["merge", "--base", base, "--finetuned", ft, "--mask", sidecar, "--out", out, "--force", "-q"]
    dowser(*args, *(["--restore", restore] if restore is not None else []))
    return out


def repair_delta_weighted(base: Path, ft: Path, sidecar: Path, restore: float, out: Path) -> Path:
    """Experiment: rank by Dowser score x |FT - BASE| (still data-free) and restore the top `restore`.

    The score is docs/METHOD.md's |W| (.) Psi^T diag(w) A / sum(w), from the sidecar's statistics.
    """
    from dowser_tool import Sidecar

    sc = Sidecar(sidecar)
    b, f = _weights(base), _weights(ft)
    for name in sc.names:
        psi, a, w = sc.stats(name)
        score = b[name].abs() * ((psi * w[:, None]).T @ a) / w.sum() * (f[name] - b[name]).abs()
        k = int(round(restore * score.numel()))
        top = torch.zeros(score.numel(), dtype=torch.bool)
        top[score.flatten().topk(k).indices] = True
        f[name] = torch.where(top.view_as(score), b[name], f[name])
    return write_like(ft, f, out)
