"""The benchmark scripts run, on small inputs, and their correctness figures hold.

Their real figures (benchmarks/RESULTS.md) come from full-size runs; these keep the
scripts working as the code under them changes.
"""

import pytest

from benchmarks.io_overlap import main as io_overlap
from benchmarks.merge_speed import main as merge_speed
from benchmarks.probe_scale import main as probe_scale


def test_probe_scale_streamed_scores_equal_the_reference():
    rows = probe_scale(["--widths", "64", "--depths", "2", "--probes", "4", "--probe-len", "8", "--draws", "2"])
    row = rows[0]
    assert row["spearman"] == 1.0 and row["mask_agreement"] == 1.0, row
    assert row["dowser_peak_rss_bytes"] > 0 and row["reference_peak_rss_bytes"] > 0


@pytest.mark.parametrize("hub", [False, True])
def test_io_overlap_reads_every_layer(hub):
    args = ["--hidden", "128", "--layers", "2", "--tokens", "256", "--repeats", "1"]
    (row,) = io_overlap(args + (["--hub-mbps", "1000"] if hub else []))
    assert row["layers"] == 2 and row["checkpoint_bytes"] > 0
    assert all(row[k] > 0 for k in ("compute_s", "serial_s", "streamed_s")), row
    if hub:  # over HTTP, reading takes measurable time (it is skipped when weights stay in memory)
        assert row["read_s"] > 0.001, row


def test_merge_speed_runs_every_figure(tmp_path):
    rows = merge_speed(["--size-gb", "0.05", "--repeats", "1", "--work", str(tmp_path)])
    figures = {r["figure"] for r in rows}
    assert {"a_dowser_merge", "a0_dowser_merge_stored_mask", "b_io_floor", "c_naive_merge", "ratios"} <= figures
    ratios = rows[-1]
    assert 0 < ratios["rss_a_over_c"] < 1.5, ratios
