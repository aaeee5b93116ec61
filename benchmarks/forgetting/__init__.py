"""Forgetting benchmark: pretrain tiny models, fine-tune with and without masks, repair, score.

Run `python -m benchmarks.forgetting [--quick] [--seeds 0,1,2] [--out DIR]`; results in RESULTS.md.
"""
