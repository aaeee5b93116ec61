"""Installed transformers and peft against the release range the test suite covers.

dowser builds on transformers internals (`conversion_mapping.get_model_conversion_mapping`,
`core_model_loading.rename_source_key` / `WeightConverter` / `WeightRenaming` / `MergeModulelist` /
`Concatenate`, `initialization.no_init_weights`, processor and cache classes) and on peft's tuners;
these change between minor releases. `check_versions()` prints one line on stderr, once per process,
when an installed transformers or peft lies outside the range `pyproject.toml` declares, instead of a
traceback or a silently wrong result later. Nothing is printed inside the range, or for a package that
is not installed (peft is optional; a missing transformers fails on its own). Set
DOWSER_SKIP_VERSION_CHECK=1 to silence the line (e.g. when trying a newer release on purpose).

The ranges are read from the installed distribution's metadata (`importlib.metadata.requires`), so
pyproject.toml is the one place they are written; `FALLBACK` (kept equal to pyproject.toml by
tests/test_compat.py) is used where that metadata is absent (e.g. running from a source tree).

This module imports neither torch nor transformers (nor `packaging`): it only reads metadata.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata

DISTRIBUTION = "dowser-tool"
CHECKED = ("transformers", "peft")
FALLBACK = {"transformers": ">=5.21,<5.26", "peft": ">=0.21,<0.22"}

_done = False

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^;()]*)\)?\s*(?:;.*)?$")
_CLAUSE = re.compile(r"^\s*(~=|===|==|!=|<=|>=|<|>)\s*([^\s]+)\s*$")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _requirements() -> list[str] | None:
    try:
        return metadata.requires(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def tested_ranges(requirements: list[str] | None = None) -> dict[str, str]:
    """{package: specifier} for the CHECKED packages: from `requirements` (default: the installed
    dowser-tool's metadata), the first requirement naming each package with a version specifier;
    FALLBACK for any package the metadata does not constrain."""
    if requirements is None:
        requirements = _requirements() or []
    ranges: dict[str, str] = {}
    for line in requirements:
        m = _REQUIREMENT.match(line)
        if not m:
            continue
        name = _normal(m.group(1))
        # metadata writes 'transformers<5.26,>=5.21': show lower bounds first, as pyproject.toml does
        spec = ",".join(sorted(filter(None, m.group(2).replace(" ", "").split(",")), key=lambda c: c[0] == "<"))
        if name in CHECKED and spec and name not in ranges:
            ranges[name] = spec
    return {name: ranges.get(name, FALLBACK[name]) for name in CHECKED}


def _release(version: str) -> tuple[int, ...] | None:
    """The numeric release of a version string ('5.26.0.dev0' -> (5, 26, 0)); None if there is none.
    Pre- and dev-releases count as their release: a 5.26 candidate is as untested as 5.26."""
    m = re.match(r"^\s*v?(?:\d+!)?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _compare(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def satisfies(version: str, specifier: str) -> bool:
    """Whether `version` meets every comma-separated clause of `specifier` (>=, >, <=, <, ==, !=, ~=,
    on release numbers; a trailing '.*' in ==/!= matches a prefix). A clause or version it cannot read
    counts as met: this check warns, it must never be the thing that fails."""
    have = _release(version)
    if have is None:
        return True
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        m = _CLAUSE.match(clause)
        if not m:
            continue
        op, target = m.groups()
        if op in ("==", "!=") and target.endswith(".*"):
            want = _release(target[:-2])
            hit = want is not None and have[:len(want)] + (0,) * max(0, len(want) - len(have)) == want
            ok = hit if op == "==" else not hit
        else:
            want = _release(target)
            if want is None:
                continue
            c = _compare(have, want)
            if op == "~=":
                prefix = want[:-1] if len(want) > 1 else want
                ok = c >= 0 and have[:len(prefix)] == prefix
            else:
                ok = {">=": c >= 0, ">": c > 0, "<=": c <= 0, "<": c < 0,
                      "==": c == 0, "===": c == 0, "!=": c != 0}[op]
        if not ok:
            return False
    return True


def version_problem() -> str | None:
    """The one-line warning for the installed transformers/peft, or None when every installed one is
    inside its tested range."""
    ranges = tested_ranges()
    outside = []
    for name in CHECKED:
        version = _installed_version(name)
        if version is not None and not satisfies(version, ranges[name]):
            outside.append((name, version, ranges[name]))
    if not outside:
        return None
    what = ", ".join(f"{name} {version} is outside the tested range {spec}" for name, version, spec in outside)
    fix = " ".join(f'"{name}{spec}"' for name, _, spec in outside)
    return f"dowser: warning: {what}; results may be wrong: install a tested version (pip install {fix})"


def check_versions() -> str | None:
    """Print `version_problem()`'s line on stderr, at most once per process; return it (None when
    nothing was printed). Never raises: a failure to read metadata prints nothing."""
    global _done
    if _done:
        return None
    _done = True
    if os.environ.get("DOWSER_SKIP_VERSION_CHECK", "") not in ("", "0"):
        return None
    try:
        line = version_problem()
    except Exception:  # noqa: BLE001  (a warning helper must not break the tool)
        return None
    if line:
        print(line, file=sys.stderr, flush=True)
    return line
