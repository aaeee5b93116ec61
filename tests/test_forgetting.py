"""The forgetting benchmark's --quick mode end to end: every row, sane metrics, a fine-tune that learns."""

import json

from benchmarks.forgetting.__main__ import main
from benchmarks.forgetting.run import MASKS, REPAIR_SCORES, settings


def test_quick_run_produces_every_row(tmp_path):
    path = main(["--quick", "--seeds", "0", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    rows = json.loads((path.parent / "results.json").read_text())["rows"]
    cfg = settings(quick=True)
    for kind in ("lm", "vlm"):
        got = {(r["group"], r["method"], r["setting"]) for r in rows if r["kind"] == kind}
        want = {("zero-shot", "pretrained", None), ("train", "full-ft", 1.0)}
        want |= {("train", name, 1.0) for name, _, _ in MASKS}
        want |= {("depth", m, d) for d in cfg["depths"] if d < 1 for m in ("full-ft", "dowser-reference")}
        want |= {("repair", m, F) for F in cfg["restore"] for m in [*REPAIR_SCORES, "dowser x |FT-BASE|"]}
        assert got == want, kind
        by = {(r["group"], r["method"], r["setting"]): r for r in rows if r["kind"] == kind}
        for r in by.values():
            assert all(0.0 <= r[k] <= 1.0 for k in r if k in ("down", "up", "H") or k.startswith("acc/"))
        # Full fine-tuning must actually learn the downstream task the pretrained model cannot do.
        assert by[("train", "full-ft", 1.0)]["down"] >= 0.5, kind
        assert by[("zero-shot", "pretrained", None)]["down"] <= 0.3, kind
    text = path.read_text()
    assert "python -m benchmarks.forgetting --quick" in text and "wall time" in text
    assert all((path.parent / f"{k}_{p}.png").exists() for k in ("lm", "vlm") for p in ("methods", "depth", "repair"))
