"""Merge methods: one module each, registered in `registry` when imported.

Every module of this package is imported here, so a new method is one new file that calls
`register(...)`: no list to edit.
"""

import importlib
import pkgutil

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, get_method, method_names

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MergeInputs", "MergeMethod", "Param", "get_method", "method_names"]
