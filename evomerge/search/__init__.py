"""The search: run config, the trial loop, samplers, the study, multi-fidelity, workers and
the run folder.

Kept light: importing `evomerge.search.study` (as `report` and `export` do) loads no torch.
"""
