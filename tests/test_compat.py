"""compat.check_versions: one warning line, once, for a transformers/peft outside the tested range."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dowser_tool import compat

ROOT = Path(__file__).resolve().parents[1]
REQUIRES = ['torch>=2.2', 'transformers<5.26,>=5.21', 'click>=8.1', 'peft<0.22,>=0.21; extra == "peft"',
            'pytest>=8; extra == "test"']


@pytest.fixture
def fake(monkeypatch):
    """Installed versions and dowser-tool's requirements as the test says, and a fresh process state."""
    installed = {"transformers": "5.25.0", "peft": "0.21.2"}
    monkeypatch.setattr(compat, "_installed_version", lambda name: installed.get(name))
    monkeypatch.setattr(compat, "_requirements", lambda: list(REQUIRES))
    monkeypatch.setattr(compat, "_done", False)
    monkeypatch.delenv("DOWSER_SKIP_VERSION_CHECK", raising=False)
    return installed


@pytest.mark.parametrize("transformers, peft", [("5.21.0", "0.21.0"), ("5.25.0", "0.21.2"), ("5.22.2", None)])
def test_versions_inside_the_range_print_nothing(fake, capsys, transformers, peft):
    fake.update(transformers=transformers, peft=peft)
    assert compat.check_versions() is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name, version", [("transformers", "5.26.0"), ("transformers", "4.57.0"),
                                           ("transformers", "5.20.2"), ("transformers", "5.26.0.dev0"),
                                           ("peft", "0.22.0"), ("peft", "0.18.1")])
def test_a_version_outside_prints_one_line_naming_package_version_and_range(fake, capsys, name, version):
    fake[name] = version
    spec = {"transformers": ">=5.21,<5.26", "peft": ">=0.21,<0.22"}[name]
    line = compat.check_versions()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip() == line
    assert f"{name} {version} is outside the tested range {spec};" in line  # lower bound first, as written
    assert f'pip install "{name}{spec}"' in line
    other = ({"transformers", "peft"} - {name}).pop()
    assert other not in line  # only the package that is out
    # at most once per process
    assert compat.check_versions() is None
    assert capsys.readouterr().err == ""


def test_both_outside_still_one_line(fake, capsys):
    fake.update(transformers="5.26.1", peft="0.22.0")
    compat.check_versions()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "transformers 5.26.1" in err and "peft 0.22.0" in err


def test_the_range_comes_from_the_package_metadata(fake, monkeypatch, capsys):
    monkeypatch.setattr(compat, "_requirements", lambda: ["transformers>=5.20,<5.30"])
    fake["transformers"] = "5.19.0"
    line = compat.check_versions()
    assert "transformers 5.19.0" in line and ">=5.20" in line and "<5.30" in line
    # peft not constrained by that metadata: the fallback applies
    assert compat.tested_ranges(["transformers>=5.20,<5.30"])["peft"] == compat.FALLBACK["peft"]


def test_without_metadata_the_fallback_applies(fake, monkeypatch, capsys):
    monkeypatch.setattr(compat, "_requirements", lambda: None)
    assert compat.tested_ranges() == compat.FALLBACK
    fake["transformers"] = "5.26.0"
    assert "transformers 5.26.0" in compat.check_versions()


def test_the_switch_silences_it(fake, monkeypatch, capsys):
    monkeypatch.setenv("DOWSER_SKIP_VERSION_CHECK", "1")
    fake["transformers"] = "5.26.0"
    assert compat.check_versions() is None
    assert capsys.readouterr().err == ""


def test_the_fallback_equals_what_pyproject_declares():
    text = (ROOT / "pyproject.toml").read_text()
    for name, spec in compat.FALLBACK.items():
        declared = re.findall(rf'"{name}((?:[<>=!~]=?[0-9.*]+,?)+)"', text)
        assert declared, f"pyproject.toml declares no range for {name}"
        assert {set(d.split(",")) == set(spec.split(",")) for d in declared} == {True}, (name, declared, spec)


@pytest.mark.parametrize("version, spec, ok", [
    ("5.21.0", ">=5.21,<5.26", True), ("5.25.9", ">=5.21,<5.26", True), ("5.26", ">=5.21,<5.26", False),
    ("5.9.0", ">=5.21,<5.26", False), ("5.100.0", "<5.26", False), ("0.21.2", "~=0.21.0", True),
    ("0.22.0", "~=0.21.0", False), ("5.25.0", "==5.25.*", True), ("5.24.0", "!=5.24.*", False),
    ("weird", ">=5.21", True), ("5.25.0", "", True),
])
def test_version_comparison(version, spec, ok):
    assert compat.satisfies(version, spec) is ok


def test_the_check_imports_neither_torch_nor_transformers():
    code = ("import sys; from dowser_tool.compat import check_versions; check_versions(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'packaging') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
