"""What every kind of search space is: a `Space` of genes that decodes to merge stages, and a
`Candidate` that writes a genome into the live evaluation model.

A kind (one sub-package of `evomerge.spaces`) provides both and registers them
(`evomerge.spaces.registry`); the search, the run folder and export see only these two shapes.

Genes are written once here: a float in bounds, or one of a few choices (a categorical gene).
A genome is a flat dict, gene name -> value, with readable names (`L0-1.add.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from evomerge.errors import UserError

if TYPE_CHECKING:
    import optuna

    from evomerge.merging.multistage import Stage

Genome = dict[str, Any]  # gene name -> a float, or a categorical gene's choice


@dataclass(frozen=True)
class Gene:
    """One searched value: a float in [low, high], or, where `choices` is given, one of them
    (a categorical gene: low and high are unused). `stage` names the merge stage whose recipe
    the gene sets, in spaces whose stages have genes of their own (a pairwise sequence's `S1`);
    None elsewhere."""

    name: str
    low: float
    high: float
    group: str  # "L0-1" or "all"
    part: str | None  # split filter, or None
    model: str | None  # pool model name for per-model parameters
    param: str
    choices: tuple[str, ...] | None = None
    stage: str | None = None

    def suggest(self, trial: optuna.Trial) -> float | str:
        """This gene's value in `trial`, drawn by the study's sampler."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        return trial.suggest_float(self.name, self.low, self.high)

    def admits(self, value: Any) -> bool:
        """Whether `value` is one this gene can take."""
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high


def suggest_genome(trial: optuna.Trial, genes: list[Gene]) -> Genome:
    """A genome drawn by the study's sampler: every gene suggested once, in order."""
    return {gene.name: gene.suggest(trial) for gene in genes}


def check_genome(genome: Genome, genes: list[Gene]) -> None:
    """UserError unless `genome` gives every gene a value it admits (a genome stored in a study
    is decoded long after the search: its space may have changed since)."""
    missing = [g.name for g in genes if g.name not in genome]
    if missing:
        raise UserError(f"the genome lacks genes {missing[:3]}; was the search space changed?")
    for gene in genes:
        value = genome[gene.name]
        if not gene.admits(value):
            allowed = (
                ", ".join(gene.choices)
                if gene.choices is not None
                else f"[{gene.low:g}, {gene.high:g}]"
            )
            raise UserError(
                f"gene {gene.name!r} = {value!r} is not one of its values ({allowed}); "
                "was the search space changed?"
            )


class Space(Protocol):
    """The genes of a search over one pool, and what a genome of them stands for.

    `kind` is the name the space's kind is registered under; `title` what the report calls
    the space; `groups` its layer groups as (label, first layer, end), in layer order, which
    the report draws genomes by."""

    kind: str
    title: str
    genes: list[Gene]
    groups: list[tuple[str, int, int]]

    def suggest(self, trial: optuna.Trial) -> Genome:
        """The genome of `trial`, every gene drawn by the study's sampler."""
        ...

    def decode(self, genome: Genome) -> list[Stage]:
        """The merge a genome stands for, as stages `evomerge merge` and mergekit run: one
        unnamed stage for a space whose candidates are one recipe. UserError where the genome
        does not fit the space."""
        ...

    def baselines(self) -> dict[str, Genome]:
        """Named genomes of the classic recipes this space can express, queued first."""
        ...


class Candidate(Protocol):
    """Writes genomes of one space into the live evaluation model, set up once per run."""

    def apply(self, genome: Genome) -> None:
        """Make the live model the merge `genome` stands for, the model `evomerge merge` makes
        of `space.decode(genome)`; CandidateError where it cannot be scored (NaN or Inf)."""
        ...
