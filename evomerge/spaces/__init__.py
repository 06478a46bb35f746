"""What a search explores: the `Space` and `Candidate` interface and the registry of space kinds
(one sub-package per kind).

Above the merge engine and fitness; below the search and results.
"""
