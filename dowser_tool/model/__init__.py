"""What a model is and how to run it one block at a time.

Owns: the skeleton built on `meta` from a config (`build`), tensor names and transformers'
renaming rules, PEFT folding and roles (`keys`), what is where in the model (`anatomy`), and the
block runner that streams decoder layers through memory tiers (`streaming`). The only package
that knows models and parses tensor names.

May import: `dowser_tool.io`, `dowser_tool.errors`.
"""
