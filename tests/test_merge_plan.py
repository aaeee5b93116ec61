"""dowser merge --dry-run: the plan lists every output tensor, agrees with what a merge writes,
and writes nothing (docs/MERGE.md, "Planning without writing")."""

import re
from pathlib import Path

import pytest
import torch

from dowser_tool.repair.merge import merge_checkpoint

from .models import make_llama
from .test_merge import make_mask, run_cli, same_bits, state_dict, write_adapter

ROW = re.compile(r"^  (\w+)\s+(\S+)  \((.*)\)$")


def listing(output: str) -> list[dict[str, list[str]]]:
    """Each output's rows (action -> names), from the CLI's dry-run text."""
    outputs = []
    for line in output.splitlines():
        if line.startswith("dry run: "):
            outputs.append({})
        elif (m := ROW.match(line)) is not None:
            outputs[-1].setdefault(m.group(1), []).append(m.group(2))
    return outputs


def names(rows: dict[str, list[str]]) -> list[str]:
    return [name for listed in rows.values() for name in listed]


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    base = make_llama(tmp / "base", seed=0, dtype=torch.bfloat16)
    ft = make_llama(tmp / "ft", seed=1, dtype=torch.bfloat16, shard_size="20KB")  # several shards
    mask, _ = make_mask(base, tmp / "m.dowser.safetensors")
    return tmp, base, ft, mask


def agree_with_merge(rows: dict[str, list[str]], out: Path, ft: Path, changed: str, base: Path) -> None:
    """Tensors listed as `changed` differ from FT in the output (where BASE does); copied ones are FT's bits."""
    got, ft_sd, base_sd = state_dict(out), state_dict(ft), state_dict(base)
    assert set(got) == set(names(rows))
    for name in rows.get(changed, []):
        assert same_bits(base_sd[name], ft_sd[name]) or not same_bits(got[name], ft_sd[name]), name
    for name in rows.get("copied", []):
        assert same_bits(got[name], ft_sd[name]), name


def test_dry_run_lists_every_tensor_and_writes_nothing(inputs, tmp_path):
    tmp, base, ft, mask = inputs
    before = files_under(tmp)
    args = ["--base", base, "--finetuned", ft, "--mask", mask, "--out", tmp_path / "out", "--restore", "0.1,0.3"]
    code, out = run_cli(*args, "--dry-run")
    assert code == 0, out
    assert files_under(tmp) == before and list(tmp_path.iterdir()) == []
    plans = listing(out)
    assert len(plans) == 2 and "out-r0.1 (restore 0.1)" in out and "out-r0.3 (restore 0.3)" in out
    for rows in plans:
        assert sorted(names(rows)) == sorted(state_dict(ft))  # every output tensor, once
        assert set(rows) == {"restored", "copied"} and len(rows["restored"]) == 14
    # the same inputs merged for real: the counts and the tensors agree
    code, written = run_cli(*args, "-q")
    assert code == 0, written
    for rows, strength in zip(plans, ("0.1", "0.3")):
        assert f"{len(rows['restored'])} tensors restored" in written
        agree_with_merge(rows, tmp_path / f"out-r{strength}", ft, "restored", base)


def test_dry_run_from_python_counts_what_the_merge_writes(inputs, tmp_path):
    _, base, ft, mask = inputs
    (plan,) = merge_checkpoint(base, ft, mask, tmp_path / "out", restore=0.2, dry_run=True, progress=False)
    assert not (tmp_path / "out").exists()
    (summary,) = merge_checkpoint(base, ft, mask, tmp_path / "out", restore=0.2, progress=False)
    assert plan.count("restored") == summary.tensors_restored
    assert plan.shards_copied == summary.shards_copied and plan.shards_copied > 0
    assert len(plan.rows) == len(state_dict(tmp_path / "out"))


def test_dry_run_interpolate_and_adapter(inputs, tmp_path):
    _, base, ft, mask = inputs
    code, out = run_cli("--base", base, "--finetuned", ft, "--interpolate", "0.5", "--out", tmp_path / "a", "--dry-run")
    assert code == 0 and list(tmp_path.iterdir()) == []
    (rows,) = listing(out)
    assert set(rows) == {"interpolated"}  # every tensor of this FT has a floating BASE twin
    code, written = run_cli("--base", base, "--finetuned", ft, "--interpolate", "0.5", "--out", tmp_path / "a", "-q")
    assert code == 0 and f"{len(rows['interpolated'])} tensors interpolated" in written
    agree_with_merge(rows, tmp_path / "a", ft, "interpolated", base)

    adapter, _ = write_adapter(tmp_path / "adapter", state_dict(base), targets=("q_proj",))
    code, out = run_cli("--base", base, "--finetuned", adapter, "--mask", mask, "--out", tmp_path / "b", "--dry-run")
    assert code == 0 and not (tmp_path / "b").exists()
    (rows,) = listing(out)
    assert len(rows["restored"]) == 14 and "adapted" not in rows  # the adapted q_proj are all masked
    assert sorted(names(rows)) == sorted(state_dict(base)) and "from BASE" in out


def test_dry_run_refusals(inputs, tmp_path):
    _, base, ft, mask = inputs
    wide, _ = make_mask(make_llama(tmp_path / "wide", seed=0, hidden=48), tmp_path / "wide.dowser.safetensors")
    before = files_under(tmp_path)
    args = ["--base", base, "--finetuned", ft, "--mask", wide, "--out", tmp_path / "out", "--dry-run"]
    code, out = run_cli(*args)
    assert code == 1 and len(out.strip().splitlines()) == 1 and out.startswith("error: ") and "has shape" in out
    # --force: every mask refused, every tensor copied; nothing written either way
    code, out = run_cli(*args, "--force")
    assert code == 0, out
    (rows,) = listing(out)
    assert set(rows) == {"copied", "refused"} and len(rows["refused"]) == 14
    assert files_under(tmp_path) == before
    (tmp_path / "out").mkdir()
    code, out = run_cli("--base", base, "--finetuned", ft, "--mask", mask, "--out", tmp_path / "out", "--dry-run")
    assert code == 1 and "already exists" in out and list((tmp_path / "out").iterdir()) == []
