"""The registry of space kinds: for each, how a space file of that kind becomes a `Space`, how
its `Candidate` is set up, and what it allows (the fitness backends that can score it, whether
its genes may be categorical, hence which samplers can draw them).

A space file names its kind (`kind: dataflow`); a file without one is a parameter space
(`parameters`). Each sub-package of `evomerge.spaces` registers its kinds when imported, and
every sub-package is imported on the first look-up, so a new kind is one sub-package whose
`__init__` calls `register_kind(...)`: no list to edit. The look-up is lazy because the kinds
import the merge engine (torch); reading a run's results needs none of them.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError

if TYPE_CHECKING:
    from evomerge.spaces.base import Candidate, Space

PARAMETERS = "parameters"  # the kind of a space file that names none
BUNDLED = Path(__file__).resolve().parents[2] / "search_spaces"


@dataclass(frozen=True)
class SpaceKind:
    """One kind of search space.

    `build(data, where, *, base, models, dtype)` makes the space of a file's mapping over a
    pool (`where` names the file in messages; UserError for a mistake in it).
    `candidate(model, space, *, seed, device, dtype)` sets up what writes its genomes into the
    live `model` (`seed`: the merge seed; `dtype`: the pool's merge dtype name, or None).
    `backends`: the fitness backends that can score its candidates (None: every one), and
    `why_backends`, the reason the others cannot. `categorical`: whether its genes may be
    categorical, which only samplers that draw categorical genes can search. `why_not_aligned`:
    why its candidates cannot align a pool's differing vocabularies (`pool.tokenizer_source`);
    empty where they can."""

    name: str
    build: Callable[..., Space]
    candidate: Callable[..., Candidate]
    categorical: bool = False
    backends: tuple[str, ...] | None = None
    why_backends: str = ""
    summary: str = ""
    why_not_aligned: str = ""

    def check_backend(self, backend: str) -> None:
        """UserError unless `backend` can score this kind's candidates."""
        if self.backends is not None and backend not in self.backends:
            raise UserError(
                f"{self.why_backends}; score it with fitness.backend: {' or '.join(self.backends)}"
            )


_KINDS: dict[str, SpaceKind] = {}


def register_kind(kind: SpaceKind) -> SpaceKind:
    if kind.name in _KINDS:
        raise ValueError(f"space kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


@cache
def _import_kinds() -> None:
    """Import every sub-package of evomerge.spaces (once): each registers its kinds."""
    import evomerge.spaces

    for module in pkgutil.iter_modules(evomerge.spaces.__path__):
        if module.ispkg:
            importlib.import_module(f"evomerge.spaces.{module.name}")


def get_kind(name: str) -> SpaceKind:
    """The kind called `name`, or a `UserError` naming the closest one."""
    _import_kinds()
    try:
        return _KINDS[name]
    except KeyError:
        known = sorted(_KINDS)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"unknown search space kind {name!r}{hint} (known: {', '.join(known)})"
        ) from None


def kind_names() -> list[str]:
    _import_kinds()
    return sorted(_KINDS)


def kind_of(data: Any) -> str:
    """The kind a space file's mapping names (`parameters` where it names none)."""
    kind = data.get("kind") if isinstance(data, dict) else None
    return PARAMETERS if kind is None else kind


def read_space(source: str | Path | dict, *, base_dir: Path = Path(".")) -> tuple[Any, str]:
    """The raw mapping of a space and where it came from (for messages): a file path (absolute,
    relative to `base_dir`, or a name in `search_spaces/`) or an inline mapping. Its `kind`
    says which kind reads it (`kind_of`)."""
    import yaml

    if isinstance(source, dict):
        return source, "space"
    path = _find_space_file(str(source), base_dir)
    try:
        return yaml.safe_load(path.read_text()), str(path)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: malformed YAML ({exc.__class__.__name__})") from None


def _find_space_file(name: str, base_dir: Path) -> Path:
    for candidate in (Path(name), base_dir / name, BUNDLED / name, BUNDLED / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in BUNDLED.glob("*.yaml"))
    raise UserError(f"search space {name!r} not found (bundled spaces: {', '.join(known)})")
