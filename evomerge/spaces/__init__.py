"""What a search explores: the `Space` and `Candidate` shapes (`base`) and the registry of space
kinds (`registry`), one sub-package per kind, which registers itself when imported.

Above the merge engine and fitness; below the search and results.
"""
