"""Checkpoint access and output files: the bottom of the data path.

Owns: reading a checkpoint lazily from a local folder or the Hub (`checkpoint`), the safetensors
layout and its header-first streaming writer (`layout`), outputs that appear whole or not at all
(`outputs`). Knows bytes, headers and files, not models.

May import: `dowser_tool.errors` only.
"""
