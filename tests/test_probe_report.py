"""What `dowser probe` tells the user beside the sidecar: a probe that leaves tensors unscored
prints one line saying how many and why (issue 22), and the summary says which dtype it computed in."""

import subprocess
import sys

from dowser_tool import Sidecar
from dowser_tool.cli.probe_cmd import unscored_line

from .families import build


def test_unscored_line_groups_reasons():
    line = unscored_line({"m.layers.0.mlp.gate.weight": "router (scored with --include router)",
                          "m.layers.1.mlp.gate.weight": "router (scored with --include router)",
                          "m.layers.1.mlp.experts.gate_up_proj[3]": "expert 3 of this stack: no probe token was routed"})
    assert line == "not scored: 3 tensors (2 router, 1 expert N of this stack); dowser inspect lists each"


def test_moe_probe_reports_its_unscored_routers(tmp_path):
    folder = build("qwen3_moe", tmp_path / "moe")
    out = tmp_path / "moe.dowser.safetensors"
    r = subprocess.run([sys.executable, "-m", "dowser_tool", "probe", str(folder), "--out", str(out), "--probes", "4",
                        "--probe-len", "8", "--batch-size", "2", "--draws", "2", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    unscored = Sidecar(out).metadata["unscored"]
    assert unscored  # the routers, scored only with --include router
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"wrote {out}") and "computed in float32 on cpu" in lines[0]
    assert lines[1] == unscored_line(unscored) and lines[1].startswith(f"not scored: {len(unscored)} tensors (")
