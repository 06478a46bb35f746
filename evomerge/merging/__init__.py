"""The merge engine: recipes (mergekit YAML), plans of tensor jobs, their executor, multi-stage
recipes and factored LoRA sources.

Above `io`, `methods` and `kernel`; below fitness, spaces, search and results.
"""
