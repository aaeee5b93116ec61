"""Training with a mask: protected entries stay exactly fixed in any optimizer.

Owns: `protect` (gradient hooks, post-step restore, optimizer state) and the Hugging Face
`Trainer` callback (`callback`).

May import: `dowser_tool.repair`, `dowser_tool.sidecar`, `dowser_tool.score`, `dowser_tool.model`,
`dowser_tool.io`, `dowser_tool.errors`.
"""
