"""The package's import structure: the layer order of docs/DESIGN_NOTES.md, and no cycles.

Read from the source (every `import` and `from ... import`, at module level or inside a
function), not from what an import happens to execute, so that a cycle hidden in a function
body is caught too. An import names the module it loads: `from evomerge.kernel import cpu`
is an edge to evomerge.kernel.cpu, `from evomerge.methods import get_method` one to the package
evomerge.methods (its __init__); the parent packages an import runs on the way are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evomerge

PACKAGE = Path(evomerge.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The evomerge modules that module `name` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*anchor, source] if source else anchor)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in MODULES else source)
    return {imported for imported in found if imported in MODULES and imported != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_reader_sees_imports_of_every_kind():
    assert (
        "evomerge.kernel.cpu" in GRAPH["evomerge.kernel.task_vectors"]
    )  # from package import module
    assert "evomerge.kernel.task_vectors" in GRAPH["evomerge.merging.executor"]  # inside a function
    assert "evomerge.methods.registry" in GRAPH["evomerge.methods"]  # an __init__
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_evomerge_modules():
    cycle = find_cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_method_module_imports_the_kernel():
    """Methods are pure references in torch; the kernel sits beneath them, chosen by the merge
    executor, so the dependency runs one way."""
    offenders = {
        name: sorted(imported for imported in imports if imported.startswith("evomerge.kernel"))
        for name, imports in GRAPH.items()
        if name.startswith("evomerge.methods")
    }
    assert not any(offenders.values()), offenders


# The layers, bottom first (docs/DESIGN_NOTES.md, "The layers"): a module may import its own
# layer and the layers below it, never one above. `pool` builds the offline demo pools beside
# the library (it needs only `io`); `cli` sits on top of everything.
LAYERS = [
    ("evomerge", "evomerge.errors"),
    ("evomerge.io",),
    ("evomerge.methods",),
    ("evomerge.kernel",),
    ("evomerge.merging",),
    ("evomerge.fitness", "evomerge.pool"),
    ("evomerge.spaces",),
    ("evomerge.search",),
    ("evomerge.results",),
    ("evomerge.cli", "evomerge.__main__"),
]


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix that names `module` or a package above it."""
    best, depth = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = index, prefix.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_every_module_sits_in_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(
        f"{name} -> {imported}"
        for name, imports in GRAPH.items()
        for imported in imports
        if layer_of(imported) > layer_of(name)
    )
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_only_the_cli_imports_results_and_pools():
    """`results` and `pool` are ends, not foundations: no library layer builds on them."""
    ends = ("evomerge.results", "evomerge.pool")
    offenders = sorted(
        f"{name} -> {imported}"
        for name, imports in GRAPH.items()
        for imported in imports
        if imported.startswith(ends) and not name.startswith(("evomerge.cli", *ends))
    )
    assert not offenders, offenders


def test_the_layer_rule_catches_an_upward_import():
    assert layer_of("evomerge.io.checkpoint") < layer_of("evomerge.search.loop")
    assert (
        layer_of("evomerge.errors") == 0 and layer_of("evomerge.cli.report_cmd") == len(LAYERS) - 1
    )
