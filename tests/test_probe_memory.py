from benchmarks.probe_memory import main as probe_memory


def test_peak_memory_does_not_follow_depth():
    """4x the layers (4x the weights): peak RSS of a fresh `dowser probe` grows by far less.

    A loose bound on small models; benchmarks/probe_memory.py measures the real figures.
    """
    rows = probe_memory(["--hidden", "512", "--layers", "2,8", "--probes", "4", "--probe-len", "8"])
    summary = rows[-1]
    assert summary["weights_growth_bytes"] > 70e6
    assert summary["rss_growth_over_weights_growth"] < 0.5, summary
