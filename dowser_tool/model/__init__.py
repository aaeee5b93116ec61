"""What a model is and how to run it one block at a time.

Owns: the skeleton built on `meta` from a config (`build`), tensor names and transformers'
renaming rules, PEFT folding and roles (`keys`), what is where in the model (`anatomy`), quantized
checkpoints (`quant`), and the block runner that streams decoder layers (`streaming`), with its
memory tiers and layer source (`tiers`), the capture of how the model calls each layer (`capture`)
and the state layers hand each other (`carry`); expert stacks' layouts (`experts`) and the stored
orientation of a weight (`orient`). The only package
that knows models and parses tensor names.

May import: `dowser_tool.io`, `dowser_tool.errors`.
"""
