"""The fine-tuning examples run end to end, offline, in reduced form (issues 5 and 15)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_training import write_test_sidecar

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def example_mask(tmp_path_factory):
    from .models import EXAMPLE_LLAVA

    return write_test_sidecar(EXAMPLE_LLAVA, tmp_path_factory.mktemp("mask") / "tiny-llava.dowser.safetensors", rho=0.1)


@pytest.mark.parametrize("script", ["finetune_with_mask.py", "finetune_hf_trainer.py", "finetune_lora.py",
                                    "finetune_trl.py"])
def test_example_runs_and_keeps_protected_entries(script, example_llava, example_mask, tmp_path):
    pytest.importorskip({"finetune_lora.py": "peft", "finetune_hf_trainer.py": "accelerate",
                         "finetune_trl.py": "trl"}.get(script, "torch"))
    out = tmp_path / "tuned"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(EXAMPLES / script), "--model", str(example_llava), "--mask", str(example_mask),
           "--steps", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "protected entries unchanged: True" in proc.stdout
    assert (out / "config.json").is_file()
    if script == "finetune_lora.py":
        assert "deltas confined to trainable rows x columns" in proc.stdout
    if script == "finetune_trl.py":
        assert "trained 3 steps with SFTTrainer" in proc.stdout
