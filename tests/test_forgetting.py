"""The forgetting benchmark's --quick mode end to end: every row, sane metrics, a fine-tune that learns,
post-hoc repairs that are what they claim (interpolation at alpha 1 is the fine-tune), a loadable processor."""

import json

import torch

from benchmarks.forgetting import report
from benchmarks.forgetting.__main__ import main
from benchmarks.forgetting.run import MASKS, POSTHOC, grid, label, settings


def test_quick_run_produces_every_row(tmp_path):
    work = tmp_path / "work"
    path = main(["--quick", "--seeds", "0", "--out", str(tmp_path / "out"), "--work", str(work), "--jobs", "1"])
    rows = json.loads((path.parent / "results.json").read_text())["rows"]
    cfg = settings(quick=True)
    for kind in ("lm", "vlm"):
        got = {(r["group"], r["method"], r["depth"], r["setting"]) for r in rows if r["kind"] == kind}
        want = {("zero-shot", "pretrained", None, None)}
        want |= {("train", m, d, None) for d in cfg["depths"] for m in ["full-ft", *[n for n, _, _ in MASKS[kind]]]}
        want |= {("posthoc", fam, d, label(p)) for d in cfg["depths"] for fam in POSTHOC for p in grid(fam, True)}
        assert got == want, kind
        by = {(r["group"], r["method"], r["depth"], r["setting"]): r for r in rows if r["kind"] == kind}
        for r in by.values():
            assert all(0.0 <= r[k] <= 1.0 for k in r if k in ("down", "up", "H") or k.startswith("acc/"))
        full = by[("train", "full-ft", 1.0, None)]
        # Full fine-tuning must actually learn the downstream task, beyond what the pretrained model does.
        assert full["down"] >= 0.5 and full["down"] > by[("zero-shot", "pretrained", None, None)]["down"] + 0.05, kind
        # Interpolation at alpha 1 is the fine-tune itself (torch.lerp is exact at 1): identical scores.
        same = by[("posthoc", "interpolation", 1.0, "alpha=1")]
        assert all(same[k] == full[k] for k in full if k in ("down", "up", "H") or k.startswith("acc/")), kind
    text = path.read_text()
    assert "python -m benchmarks.forgetting --quick" in text and "wall time" in text
    assert "Post-hoc, paired" in text and "best interpolation" in text
    assert all((path.parent / f"{k}_{p}.png").exists() for k in ("lm", "vlm") for p in ("methods", "repair"))

    # The rows saved after each seed report an interrupted run: the same rows, marked partial.
    partial = main(["--report-only", "--quick", "--partial", str(work), "--out", str(tmp_path / "partial")])
    saved = json.loads((partial.parent / "results.json").read_text())
    assert saved["rows"] == rows and "partial run" in partial.read_text()

    # The VLM's processor loads with AutoProcessor and expands <image> to the model's image tokens.
    from transformers import AutoConfig, AutoProcessor

    proc = AutoProcessor.from_pretrained(work / "vlm" / "base")
    cfg_vlm = AutoConfig.from_pretrained(work / "vlm" / "base")
    batch = proc(text="<image> count ?", images=torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), return_tensors="pt")
    assert int((batch["input_ids"] == cfg_vlm.image_token_index).sum()) == cfg_vlm.image_seq_length
    assert tuple(batch["pixel_values"].shape) == (1, 3, 32, 32)


def test_paired_interval_hand_example():
    rows = [dict(kind="k", group="g", method=m, depth=1.0, setting=None, seed=s, down=0, up=0, H=h)
            for m, hs in (("a", (0.5, 0.7, 0.6)), ("b", (0.4, 0.5, 0.6))) for s, h in enumerate(hs)]
    agg = report.aggregate(rows)
    p = report.paired(agg[("k", "g", "a", 1.0, None)], agg[("k", "g", "b", 1.0, None)])
    # differences 0.1, 0.2, 0.0: mean 0.1, sd 0.1, half-width t(2) * 0.1 / sqrt(3) = 4.303 * 0.0577
    assert abs(p["mean"] - 0.1) < 1e-12 and abs(p["hi"] - (0.1 + 4.303 * 0.1 / 3**0.5)) < 1e-9
    assert (p["wins"], p["losses"], p["n"]) == (2, 0, 3)
