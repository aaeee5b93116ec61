"""The shape of the source tree: imports flow one way, code comes in pieces one can read, and
the CLI starts without torch or transformers (docs/ARCHITECTURE.md)."""

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dowser_tool"

# Each stage of the data path, bottom to top. A module may import its own package and any
# package with a lower rank; equal ranks are siblings and must not import each other.
RANK = {"errors": 0, "compat": 0, "io": 1, "score": 1, "model": 2, "sidecar": 3, "probe": 4, "repair": 4,
        "train": 5, "interop": 6, "cli": 7}
TOP_LEVEL = {"__init__", "__main__", "_moved"}  # the package's face: lazy names only
MAX_CLASS, MAX_FUNCTION = 250, 60


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, path.relative_to(PKG).with_suffix("").parts


def _stage(parts) -> str:
    return parts[0]


def _imports(path: Path, parts):
    """Every dowser_tool module a file imports, as (line, dotted path inside dowser_tool)."""
    tree = ast.parse(path.read_text())
    pkg = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif (node.module or "").startswith("dowser_tool"):
                names = [node.module[len("dowser_tool"):].lstrip(".")]
            else:
                continue
            for name in names:
                yield node.lineno, name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dowser_tool."):
                    yield node.lineno, a.name[len("dowser_tool."):]


def test_every_package_states_its_job_and_imports():
    for path in PKG.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            doc = ast.get_docstring(ast.parse((path / "__init__.py").read_text())) or ""
            assert "May import" in doc or path.name == "cli", f"{path.name}/__init__.py: say what it owns and may import"


def test_imports_flow_one_way():
    climbs = []
    for path, parts in _modules():
        if parts[0] in TOP_LEVEL:
            continue
        here = _stage(parts)
        assert here in RANK, f"{path}: a new top-level module or package needs a rank in this test"
        for line, target in _imports(path, parts):
            stage = target.split(".")[0] if target else ""
            if stage in ("", "__init__") or stage == here or stage == "_moved":
                continue  # `from .. import __version__`, own package
            if RANK.get(stage, -1) >= RANK[here]:
                climbs.append(f"{path.relative_to(PKG.parent)}:{line} ({here}) imports {target} ({stage})")
    assert not climbs, "imports that climb back up or sideways:\n" + "\n".join(climbs)


def test_import_graph_check_catches_a_climb(tmp_path):
    # The check itself can fail: a model/ module importing the probe is a climb.
    fake = tmp_path / "x.py"
    fake.write_text("from ..probe.run import probe\n")
    assert [t for _, t in _imports(fake, ("model", "x"))] == ["probe.run"]
    assert RANK["probe"] >= RANK["model"]


def _longest():
    rows = []
    for path, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                rows.append((kind, node.end_lineno - node.lineno + 1, f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}"))
    return rows


def test_classes_and_functions_read_in_one_sitting():
    rows = _longest()
    cls = max((r for r in rows if r[0] == "class"), key=lambda r: r[1])
    fn = max((r for r in rows if r[0] == "function"), key=lambda r: r[1])
    print(f"\nlongest class: {cls[1]} lines ({cls[2]}); longest function: {fn[1]} lines ({fn[2]})")
    too_long = [r for r in rows if r[1] > (MAX_CLASS if r[0] == "class" else MAX_FUNCTION)]
    assert not too_long, "\n".join(f"{k} {n} lines: {where}" for k, n, where in too_long)


def _run(code: str) -> str:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                          cwd=PKG.parent).stdout


@pytest.mark.parametrize("argv", [["--help"], ["probe", "--help"], ["merge", "--help"], ["inspect", "--help"],
                                  ["mask", "--help"], ["import-scores", "--help"],
                                  ["sparse-adapter", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv):
    out = _run(
        "import sys\n"
        "from dowser_tool.cli import main\n"
        f"try:\n    main({argv!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n")
    assert "HEAVY []" in out, out[-500:]


def test_old_module_paths_still_work_with_a_warning():
    import dowser_tool

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from dowser_tool import merge as old_merge  # noqa: F401  (the 0.1 path)
        from dowser_tool.repair import merge as new_merge
    assert old_merge is new_merge
    assert any("dowser_tool.repair.merge" in str(w.message) for w in caught if w.category is DeprecationWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from dowser_tool.repair import interpolate
    from dowser_tool.repair.methods import interpolate as moved

    assert interpolate is moved and any(w.category is DeprecationWarning for w in caught)
    assert set(dowser_tool.__all__) >= {"protect", "load_mask", "Sidecar", "open_checkpoint"}
