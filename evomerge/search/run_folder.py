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
from evomerge.search.config import RunConfig
from evomerge.search.study import storage_url

if TYPE_CHECKING:
    from evomerge.spaces.dataflow import DataflowSpace
    from evomerge.spaces.parameters.space import SearchSpace

RUN_FORMAT = 1  # bump when the run folder layout changes incompatibly


@dataclass(frozen=True)
class RunGenes:
    """The genes of a run as run.json keeps them. Each gene is a dict with the fields of
    `evomerge.spaces.parameters.space.Gene`: name, low, high, group, part, model, param, and choices (a
    categorical gene's values; absent in runs made before categorical genes)."""

    method: str
    groups: tuple[str, ...]  # layer group labels, in layer order
    genes: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, space: SearchSpace) -> RunGenes:
        return cls(
            method=space.title,
            groups=tuple(label for label, _, _ in space.groups),
            genes=tuple(dataclasses.asdict(g) for g in space.genes),
        )

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "groups": list(self.groups), "genes": list(self.genes)}


def build_space(config: RunConfig) -> SearchSpace | DataflowSpace:
    """The run's search space over its pool: parameter space (reads the base model's layer
    count), or the kind its file names (`dataflow`, `method_per_group`, `pairwise`)."""
    space = _space_of_kind(config)
    categorical = [g.name for g in space.genes if g.choices is not None]
    if categorical and config.search.sampler in ("cmaes", "cmaes_warm"):
        raise UserError(
            f"sampler {config.search.sampler!r} would draw the categorical gene {categorical[0]!r} at random "
            "(CMA-ES searches floats only); use sampler gp, tpe or random for this space"
        )
    return space


def _space_of_kind(config: RunConfig):
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.merging.recipe import validate_model
    from evomerge.spaces.parameters.space import SearchSpace, SpaceConfig, read_space

    data, where = read_space(config.space)
    pool = dict(base=config.pool.base, models=dict(config.pool.models), dtype=config.pool.dtype)
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind in ("method_per_group", "pairwise"):
        from evomerge.spaces.staged import (
            MethodPerGroupConfig,
            MethodPerGroupSpace,
            PairwiseConfig,
            PairwiseSpace,
        )

        space_class, config_class = {
            "method_per_group": (MethodPerGroupSpace, MethodPerGroupConfig),
            "pairwise": (PairwiseSpace, PairwiseConfig),
        }[kind]
        return space_class(
            validate_model(config_class, data, where),
            num_layers=Checkpoint(config.pool.base).num_layers,
            **pool,
        )
    if kind == "dataflow":
        from evomerge.spaces.dataflow import DataflowConfig, DataflowSpace

        if config.fitness.backend == "vllm":
            raise UserError(
                "a data-flow space changes the model's depth per trial, which a running vLLM engine "
                "cannot; score it with fitness.backend: hf"
            )
        return DataflowSpace(validate_model(DataflowConfig, data, where), **pool)
    return SearchSpace(
        validate_model(SpaceConfig, data, where),
        num_layers=Checkpoint(config.pool.base).num_layers,
        **pool,
    )


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
    from evomerge.io.fingerprint import pool_fingerprints
    from evomerge.search.config import load_run_config

    run_dir = Path(run_dir)
    _read_meta(run_dir)
    config = load_run_config(run_dir / "config.yaml")
    if check_pool:
        saved = json.loads((run_dir / "pool.json").read_text())
        now = pool_fingerprints(config)
        changed = [name for name in saved if saved[name] != now.get(name)]
        if changed:
            raise UserError(
                f"the model pool changed since this run started ({', '.join(changed)}); "
                "resuming would mix scores of different models — start a new run"
            )
    return config


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
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{meta_file} is corrupt") from None
    if meta.get("run_format") != RUN_FORMAT:
        raise UserError(
            f"{str(run_dir)!r} was written by evomerge {meta.get('evomerge_version', '?')} "
            f"(run format {meta.get('run_format')}); this evomerge {__version__} reads format {RUN_FORMAT}"
        )
    return meta
