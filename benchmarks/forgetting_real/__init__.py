"""Forgetting on a real pretrained model (SmolLM2-135M-Instruct): see RESULTS.md."""
