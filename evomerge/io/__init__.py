"""Reading and writing model folders: checkpoints, LoRA adapters, sharded output, fingerprints.

The bottom layer: it imports nothing of evomerge but `evomerge.errors`, and nothing read from a
model folder may resolve outside it.
"""
