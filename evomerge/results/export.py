"""Export a search result: the trial's recipe (mergekit YAML) and the merged model.

The model is produced by `evomerge.merging.executor.run_merge` from the same recipe and merge seed
that the search materialised in memory, through the same tensor code, so it equals the scored
candidate bit for bit (when exported in the merge dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge import __version__
from evomerge.errors import UserError
from evomerge.search.run_folder import build_space, read_run_folder
from evomerge.search.study import best_trial, open_run_study
from evomerge.spaces.refine import REFINED_ATTR

if TYPE_CHECKING:
    from evomerge.merging.executor import MergeSummary
    from evomerge.merging.multistage import Stage
    from evomerge.merging.recipe import Recipe
    from evomerge.spaces.base import Space


def export_trial(
    run_dir: Path,
    out_dir: Path,
    *,
    trial_number: int | None = None,
    force: bool = False,
    say: Callable[[str], Any] = lambda text: None,
) -> MergeSummary:
    """Merge the trial into `out_dir`; `say` gets its dev and test scores as text."""
    from evomerge.io.output import parse_size
    from evomerge.merging.multistage import Stage, run_stages
    from evomerge.results.heldout import chosen_scores
    from evomerge.results.table import format_held_out

    config = read_run_folder(run_dir)
    study = open_run_study(config, Path(run_dir))
    trial = _pick(study, trial_number)
    stages = trial_stages(build_space(config, run_dir), trial)
    if config.export.out_dtype:  # the final merge's, as recipe.yaml will say
        update = {"out_dtype": config.export.out_dtype}
        stages = [s if s.name else Stage(None, s.recipe.model_copy(update=update)) for s in stages]
    scores = chosen_scores(config, Path(run_dir), study, trial)
    say(format_held_out(scores))
    card = model_card(stages, trial, config, run_dir, scores)
    return run_stages(
        stages,
        out_dir,
        seed=config.search.merge_seed,
        device=config.device,
        shard_bytes=parse_size(config.export.shard_size),
        force=force,
        extra_files={"README.md": card},
    )


def pick_trial(run_dir: Path, trial_number: int | None = None):
    """The run's config and the trial to export: number `trial_number`, or the best."""
    config = read_run_folder(run_dir)
    return config, _pick(open_run_study(config, Path(run_dir)), trial_number)


def trial_recipe(space: Space, trial) -> Recipe:
    """The recipe a trial scored, in a space whose candidates are one recipe."""
    (stage,) = trial_stages(space, trial)
    return stage.recipe


def trial_stages(space: Space, trial) -> list[Stage]:
    """The stages of the merge a trial scored: its genome decoded in the run's space (a refined
    trial: its recipe with per-tensor weights, `evomerge.spaces.refine`)."""
    genome = {g.name: trial.params[g.name] for g in space.genes}
    if REFINED_ATTR in trial.user_attrs:
        from evomerge.merging.multistage import Stage
        from evomerge.spaces.refine.recipe import refined_recipe

        return [Stage(None, refined_recipe(space, genome, trial.user_attrs[REFINED_ATTR]))]
    return space.decode(genome)


def _pick(study, trial_number: int | None):
    from optuna.trial import TrialState

    if trial_number is None:
        trial = best_trial(study)
        if trial is None:
            raise UserError("the study has no completed trial to export yet")
        return trial
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial_number not in trials:
        raise UserError(f"the study has no trial #{trial_number} (it has {len(trials)} trials)")
    trial = trials[trial_number]
    if trial.state != TrialState.COMPLETE:
        raise UserError(f"trial #{trial_number} did not complete ({trial.state.name.lower()})")
    return trial


def _cell(part: dict, task: str) -> str:
    value, se = part["per_task"].get(task), part["se"].get(task)
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def score_rows(scores: dict) -> str:
    """The model card's table: each task on dev (the search chose on it) and test (held out)."""
    if "unavailable" in scores:
        return f"Not computed: {scores['unavailable']}."
    trial = scores["trials"][0]
    rows = [
        f"| {task} | {_cell(trial['dev'], task)} | {_cell(trial['test'], task)} |"
        for task in trial["dev"]["per_task"]
    ]
    rows.append(
        f"| combined fitness | {trial['dev']['value']:.4f} | {trial['test']['value']:.4f} |"
    )
    single = [t for t, held in scores["held_out"].items() if not held]
    note = (
        f"\n\n{', '.join(single)}: one split only, so the test column is scored on the examples "
        "the search chose on, not held out."
        if single
        else ""
    )
    return "| task | dev | test |\n|---|---|---|\n" + "\n".join(rows) + note


def _public_name(reference: str) -> str:
    """A model reference as a card shows it: a local folder by its name, a hub id as it is
    (each part of `base+adapter` alike)."""
    parts = reference.split("+")
    return "+".join(Path(part).name if Path(part).expanduser().exists() else part for part in parts)


def model_card(stages, trial, config, run_dir, scores: dict) -> str:
    # A card is written to be published: it names models, never this machine's paths.
    sources = "\n".join(
        f"- `{name}`: {_public_name(path)}" for name, path in config.pool.models.items()
    )
    methods = [f"`{s.recipe.merge_method}`" for s in stages]
    what = (
        f"a {methods[0]} merge"
        if len(stages) == 1
        else f"a {len(stages)}-stage merge ({' then '.join(methods)})"
    )
    return f"""---
tags: [merge, evomerge]
---
# Merged model (evomerge trial #{trial.number})

Made by evomerge {__version__}: {what} whose per-layer
parameters were searched ({config.search.sampler}, seed {config.search.seed}) against the
evaluation tasks below. The recipe is in `recipe.yaml` (mergekit-compatible); DARE/DELLA masks
use merge seed {config.search.merge_seed}.

Base model: {_public_name(config.pool.base)}

Sources:
{sources}

## Scores

Every example of each task, ± bootstrap standard error. The search chose this merge on the
dev split; the test split was scored once, afterwards, and never seen by the search.

{score_rows(scores)}

Run folder: {Path(run_dir).name}
"""
