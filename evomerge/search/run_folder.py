"""A run folder: what `evomerge search` writes before its first trial, and reads back.

    config.yaml   the run's config (paths made absolute), what `resume` and `worker` run
    pool.json     fingerprints of the pool's models, so `resume` can tell that one changed
    run.json      evomerge version, run format, storage URL and the run's gene list

and, once trials run:

    study.db      the Optuna study (unless search.storage names another storage)
    examples/     per trial, `<number>.json`: the dev examples it scored and the metric on each
                  (`evomerge.search.fidelity.write_examples`)
    search.log    what lm-eval, transformers and Optuna printed (`cli.process.quiet_output`)

The gene list (the merge method, the layer groups and every gene with its bounds) lets
`evomerge report` draw a genome without the pool: the models may be gone by then. Reading a
run folder loads no torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge import __version__
from evomerge.errors import UserError
from evomerge.io.checkpoint import read_json_object
from evomerge.search.config import RunConfig
from evomerge.search.study import storage_url

if TYPE_CHECKING:
    from evomerge.merging.plan import MergePlan
    from evomerge.spaces.base import Space

RUN_FORMAT = 1  # bump when the run folder layout changes incompatibly


@dataclass(frozen=True)
class RunGenes:
    """The genes of a run as run.json keeps them. Each gene is a dict with the fields of
    `evomerge.spaces.base.Gene`: name, low, high, group, part, model, param, choices (a
    categorical gene's values; absent in runs made before categorical genes) and stage (the
    merge stage the gene sets, in spaces whose stages have genes of their own; absent in runs
    made before it was kept)."""

    method: str
    groups: tuple[str, ...]  # layer group labels, in layer order
    genes: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, space: Space) -> RunGenes:
        return cls(
            method=space.title,
            groups=tuple(label for label, _, _ in space.groups),
            genes=tuple(dataclasses.asdict(g) for g in space.genes),
        )

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "groups": list(self.groups), "genes": list(self.genes)}


def build_space(config: RunConfig, run_dir: Path | None = None) -> Space:
    """The run's search space over its pool, built by the kind its file names
    (`evomerge.spaces.registry`), after checking that the run's backend can score that kind
    and its sampler can draw the space's genes. For a method that reads input statistics
    (RegMean), its recipes name the run's files (`statistics_files`); without `run_dir` the
    space gives genes and baselines but no recipe."""
    from evomerge.search.samplers import SAMPLERS, able
    from evomerge.spaces.registry import get_kind, kind_of, read_space

    data, where = read_space(config.space)
    kind = get_kind(kind_of(data))
    kind.check_backend(config.fitness.backend)
    if config.pool.vocabulary() and kind.why_not_aligned:  # (before it opens the pool)
        raise UserError(
            f"pool.tokenizer_source cannot align vocabularies in a {kind.name} space "
            f"({kind.why_not_aligned}); search a space such as ties_layers, or bring the pool to "
            "one vocabulary with `evomerge merge` first"
        )
    space = kind.build(
        data,
        where,
        base=config.pool.base,
        models=dict(config.pool.models),
        dtype=config.pool.dtype,
    )
    categorical = [g.name for g in space.genes if g.choices is not None]
    if categorical and not SAMPLERS[config.search.sampler].categorical:
        capable = able("categorical")
        raise UserError(
            f"sampler {config.search.sampler!r} would draw the categorical gene "
            f"{categorical[0]!r} at random (it models floats only); use sampler "
            f"{', '.join(capable[:-1])} or {capable[-1]} for this space"
        )
    keys = output_tokenizer(config)
    if keys:  # every recipe carries them
        space.vocabulary = keys
    if run_dir is not None and getattr(getattr(space, "method", None), "statistics", False):
        space.statistics = {
            config.pool.models[name]: str(path)
            for name, path in statistics_files(config, run_dir).items()
        }
    return space


def output_tokenizer(config: RunConfig) -> dict[str, Any]:
    """The recipe keys of the output tokenizer that every recipe of the search carries: the
    pool's vocabulary source (`pool.tokenizer_source` or `pool.tokenizer`) and its chat
    template (`pool.chat_template`, `auto` chosen once among the pool's models)."""
    from evomerge.merging.chat import search_chat_template

    keys = dict(config.pool.vocabulary())
    template = search_chat_template(
        config.pool.chat_template, [config.pool.base, *config.pool.models.values()]
    )
    if template is not None:
        keys["chat_template"] = template
    return keys


def output_plan(config: RunConfig) -> MergePlan:
    """A merge plan of the search's first stage: what every merge of the search shares (the
    output vocabulary and each model's row of each output token, the config and tokenizer
    files) does not depend on the genome, so any genome's gives it. It reads no statistics
    (a RegMean search plans it before they are collected)."""
    from evomerge.merging.plan import plan_merge

    space = build_space(config)
    if getattr(getattr(space, "method", None), "statistics", False):
        space.statistics = dict.fromkeys(config.pool.models.values(), "")  # named, never read
    genome = {g.name: g.choices[0] if g.choices else g.low for g in space.genes}
    recipe = space.decode(genome)[0].recipe
    return plan_merge(recipe.model_copy(update={"statistics": None}))


def statistics_files(config: RunConfig, run_dir: Path) -> dict[str, Path]:
    """Pool model name -> its input statistics file in the run folder (written by the search
    when it starts, `evomerge.fitness.statistics`)."""
    folder = Path(run_dir).resolve() / "statistics"
    return {name: folder / f"{name}.safetensors" for name in config.pool.models}


def write_run_folder(config: RunConfig, run_dir: Path) -> None:
    """Snapshot the config, fingerprint the pool (so `resume` can check nothing moved) and
    keep the gene list."""
    import yaml

    from evomerge.io.fingerprint import pool_fingerprints

    run_dir = Path(run_dir)
    genes = RunGenes.of(build_space(config))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    (run_dir / "pool.json").write_text(json.dumps(pool_fingerprints(config), indent=2))
    meta = {
        "evomerge_version": __version__,
        "run_format": RUN_FORMAT,
        "storage": storage_url(config, run_dir),
        "space": genes.to_json(),
    }
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))


def read_run_folder(run_dir: Path, *, check_pool: bool = True) -> RunConfig:
    """The config of an existing run, after checking the folder and the pool."""
    from evomerge.io.fingerprint import VERSION, pool_fingerprints
    from evomerge.search.config import load_run_config

    run_dir = Path(run_dir)
    _read_meta(run_dir)
    config = load_run_config(run_dir / "config.yaml")
    _check_study_exists(config, run_dir)
    if check_pool:
        saved = _read_pool_record(run_dir)
        # a run started before configs, tokenizers and tasks were fingerprinted kept weights only
        legacy = not all(v.startswith(VERSION) for v in saved.values())
        now = pool_fingerprints(config, weights_only=legacy)
        changed = [name for name in saved if saved[name] != now.get(name)]
        if changed:
            raise UserError(
                f"the model pool changed since this run started ({', '.join(changed)}); "
                "resuming would mix scores of different models — start a new run"
            )
    return config


def _check_study_exists(config: RunConfig, run_dir: Path) -> None:
    """A run whose study file is gone is refused: opening it would create an empty study
    (writing into the folder) and then report or resume nothing."""
    url = storage_url(config, run_dir)
    file = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if url.startswith("journal:") or url.endswith(".log"):
        file = url.removeprefix("journal:")
    if file is not None and not Path(file).exists():
        raise UserError(
            f"the study of run {str(run_dir)!r} is missing ({file} does not exist), so it has "
            "no trials to read; restore the file or start a new run"
        )


def _read_pool_record(run_dir: Path) -> dict[str, str]:
    """pool.json: the fingerprints of the models the run started with."""
    file = run_dir / "pool.json"
    try:
        saved = read_json_object(file)
    except UserError:
        saved = None
    if not saved or not all(isinstance(v, str) for v in saved.values()):
        raise UserError(
            f"{file} is missing or corrupt, so the pool cannot be checked against the run's; "
            "restore it, or start a new run"
        )
    return saved


def read_run_genes(run_dir: Path) -> RunGenes:
    """The gene list the run was started with."""
    meta = _read_meta(Path(run_dir))
    if "space" not in meta:
        raise UserError(
            f"{Path(run_dir) / 'run.json'} has no gene list (the run was started by evomerge "
            f"{meta.get('evomerge_version', '?')}, before run folders kept one)"
        )
    space = meta["space"]
    return RunGenes(
        method=space["method"], groups=tuple(space["groups"]), genes=tuple(space["genes"])
    )


def _read_meta(run_dir: Path) -> dict[str, Any]:
    meta_file = run_dir / "run.json"
    if not meta_file.exists():
        raise UserError(f"{str(run_dir)!r} is not an evomerge run folder (no run.json)")
    try:
        meta = read_json_object(meta_file)
    except UserError:
        raise UserError(f"{meta_file} is corrupt; restore it, or start a new run") from None
    if meta.get("run_format") != RUN_FORMAT:
        raise UserError(
            f"{str(run_dir)!r} was written by evomerge {meta.get('evomerge_version', '?')} "
            f"(run format {meta.get('run_format')}); "
            f"this evomerge {__version__} reads format {RUN_FORMAT}"
        )
    return meta
