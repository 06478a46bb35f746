"""evomerge: learned model merging.

Search per-layer merge coefficients against an evaluation signal, and run every classic
merge method (mergekit-compatible recipes) as a plain merge.
"""

__version__ = "0.1.0"
