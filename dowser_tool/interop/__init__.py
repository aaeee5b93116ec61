"""The tool's outputs in other people's formats.

Owns: Hub model cards for sidecars (`card`) and interchange with the released Model-Dowser
scripts' per-module score files (`released`).

May import: every package below `cli`.
"""
