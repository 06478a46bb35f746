"""The run configuration of a search: one YAML file, validated up front.

    pool:
      base: runs/demo-pool/base
      models: {add: runs/demo-pool/add, rev: runs/demo-pool/rev}
      dtype: float32
    space: dare_ties_layers              # a file in search_spaces/, a path, or a mapping
    fitness: {task_paths: [eval_tasks], tasks: [...], subset: {count: 40}}
    search: {sampler: gp, trials: 40, seed: 0}      # objectives: combined | per_task
    device: cpu

Relative paths are read relative to the config file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import UserError
from evomerge.fitness.config import FitnessConfig
from evomerge.io.checkpoint import reference_parts
from evomerge.io.dtypes import MERGE_DTYPES
from evomerge.merging.recipe import (
    ModelTokenSource,
    TokenizerSettings,
    check_file_size,
    validate_model,
)
from evomerge.search.refine_config import (
    RefineConfig,
    check_refinable,
    check_statistics,
    parse_refine,
)
from evomerge.search.samplers import SAMPLERS, able


class PoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base: str
    models: dict[str, str] = Field(min_length=1)
    dtype: str | None = "float32"
    tokenizer_source: str | None = None
    """`union`, `base` or a model (a pool name or a folder): the output vocabulary of every
    merge, when the pool's vocabularies differ (mergekit's `tokenizer_source`, as `evomerge
    merge` reads it); None: the pool must share one vocabulary."""
    tokenizer: TokenizerSettings | None = None
    """mergekit's `tokenizer:` block (source, tokens, pad_to_multiple_of), instead of
    `tokenizer_source`; its model references may be pool names (or `base`) too."""
    chat_template: str | None = None
    """mergekit's `chat_template:` for every merge of the search: a bundled name (`chatml`,
    ...), `auto` (the template most of the pool's models share, chosen once when the search
    starts) or Jinja text; the live model's tokenizer renders prompts with it and export writes
    it (`evomerge.merging.chat.search_chat_template`). None: the tokenizer's own."""

    @model_validator(mode="after")
    def _one_vocabulary_source(self) -> PoolConfig:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' block, not both")
        return self

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        from evomerge.merging.chat_templates import check_chat_template

        return check_chat_template(value)

    def vocabulary(self) -> dict[str, Any]:
        """The recipe keys that align the pool's vocabularies (`tokenizer_source` or
        `tokenizer`), which every recipe of the search carries; {} where there is none."""
        if self.tokenizer is not None:
            return {"tokenizer": self.tokenizer}
        if self.tokenizer_source is not None:
            return {"tokenizer_source": self.tokenizer_source}
        return {}

    @field_validator("models", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        """A plain list of folders gets the folder names as short names."""
        if isinstance(value, list):
            return {Path(str(v)).name: v for v in value}
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in MERGE_DTYPES:
            raise ValueError(f"dtype {value!r} is not one of {', '.join(MERGE_DTYPES)}")
        return value


class Fidelity(BaseModel):
    """Multi-fidelity over examples (asynchronous successive halving, `evomerge.search.fidelity`):
    every trial scores the fitness subset first (rung 0); each further rung scores `eta` times
    as many examples per task, the last all of dev, and a trial goes on to the next rung only
    while its value there is in the top 1/`eta` of the values trials reached there so far."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    eta: float = Field(default=3.0, gt=1.0, allow_inf_nan=False)


DEFAULT_SAMPLER = "gp"  # chosen on dev by bench/search_quality.py (docs/BENCHMARKS.md)
"""The sampler of a config that names none (the one place to change the default)."""


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sampler: str = DEFAULT_SAMPLER
    """One of `evomerge.search.samplers.SAMPLERS`."""
    objectives: Literal["combined", "per_task"] = "combined"
    """`combined`: maximise the weighted fitness; `per_task`: one objective per task, a Pareto
    front of trade-offs (export takes the front's best combined fitness)."""
    trials: int = Field(default=40, ge=1)
    timeout_minutes: float | None = Field(default=None, gt=0)
    seed: int = 0
    storage: str | None = None
    study_name: str = "evomerge"
    baselines: bool = True
    fidelity: Fidelity | None = Field(default_factory=Fidelity)
    """`null`: every trial is scored on all of dev (as without `fitness.subset`)."""
    merge_seed: int = 0
    heartbeat_seconds: int = Field(default=10, ge=1)
    """Workers on SQL storage beat this often; a trial whose worker stopped beating for
    `grace_seconds` (killed, node lost) is marked failed and retried once."""
    grace_seconds: int = Field(default=60, ge=1)
    refine: RefineConfig | None = None
    """`gradient`: after the budget, refine the best trial's weights per tensor on dev
    (`evomerge.search.refine`); null: the black-box search only."""
    tier: Literal["auto", "device", "host"] = "auto"
    """Where a parameter space's prepared inputs live (evomerge/search/memory_plan.py):
    `device`, on the merge device; `host`, in host memory, streamed through a staging buffer on
    the device into each merge (the same numbers, bit for bit); `auto`, the device tier where
    the memory plan fits the device, else the host tier."""

    @field_validator("refine", mode="before")
    @classmethod
    def _refine_off(cls, value: Any) -> Any:
        return parse_refine(value)

    @model_validator(mode="before")
    @classmethod
    def _no_promotion(cls, data: Any) -> Any:
        if isinstance(data, dict) and "promotion" in data:
            raise ValueError(
                "search.promotion was replaced by search.fidelity: write `fidelity: {eta: 3}` "
                "(the fitness subset is its first rung) or `fidelity: null` to score every trial "
                "on all of dev"
            )
        return data

    @field_validator("sampler", mode="before")
    @classmethod
    def _no_multi(cls, value: Any) -> Any:
        if value == "multi":
            raise ValueError(
                "'multi' is not a sampler: for one objective per task write "
                "`objectives: per_task` with `sampler: tpe` (or random)"
            )
        return value

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            close = difflib.get_close_matches(value, list(SAMPLERS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown sampler {value!r}{hint} (known: {', '.join(SAMPLERS)})")
        return value

    @model_validator(mode="after")
    def _sampler_fits_objectives(self) -> SearchConfig:
        if self.objectives == "per_task" and not SAMPLERS[self.sampler].objectives:
            choices = [f"`sampler: {name}`" for name in able("objectives")]
            raise ValueError(
                f"the {self.sampler} sampler optimises one objective; with `objectives: "
                f"per_task` choose {', '.join(choices[:-1])} or {choices[-1]}"
            )
        return self


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    shard_size: str = "5GB"


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pool: PoolConfig
    space: str | dict
    fitness: FitnessConfig
    search: SearchConfig = Field(default_factory=SearchConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _aligned_where_it_can_be(self) -> RunConfig:
        if self.pool.vocabulary() and self.search.refine is not None:
            raise ValueError(
                "search.refine cannot refine a pool whose vocabularies are aligned "
                "(pool.tokenizer_source); set `refine: null`"
            )
        return self

    @model_validator(mode="after")
    def _refinable(self) -> RunConfig:
        check_statistics(self.space, backend=self.fitness.backend, models=self.pool.models)
        if self.search.refine is not None:
            check_refinable(
                self.space,
                backend=self.fitness.backend,
                objectives=self.search.objectives,
                models=self.pool.models,
            )
        return self

    def resolved(self, base_dir: Path) -> RunConfig:
        """Paths made absolute against `base_dir` (the config file's folder)."""

        def absolute(p: str) -> str:
            parts = reference_parts(p, base_dir=base_dir)
            if len(parts) > 1:  # base+adapter: each folder
                return "+".join(map(absolute, parts))
            path = Path(p).expanduser()
            return str(path if path.is_absolute() else (base_dir / path).resolve())

        models = {k: absolute(v) for k, v in self.pool.models.items()}

        def model_ref(ref: str) -> str:  # a pool name (or `base`), else a folder
            if ref in models:
                return models[ref]
            return absolute(self.pool.base) if ref == "base" else absolute(ref)

        source = self.pool.tokenizer_source
        if source is not None and source not in ("union", "base"):
            source = model_ref(source)
        tokenizer = self.pool.tokenizer
        if tokenizer is not None:
            tokens = {}
            for token, entry in (tokenizer.tokens or {}).items():
                donor = entry.source
                if isinstance(donor, ModelTokenSource):
                    donor = donor.model_copy(update={"model": model_ref(donor.model)})
                elif isinstance(donor, str):
                    donor = model_ref(donor)
                tokens[token] = entry.model_copy(update={"source": donor})
            named = tokenizer.source
            if named not in ("union", "base"):
                named = model_ref(named)
            tokenizer = tokenizer.model_copy(
                update={"source": named, "tokens": tokens if tokenizer.tokens else None}
            )
        pool = self.pool.model_copy(
            update={
                "base": absolute(self.pool.base),
                "models": models,
                "tokenizer_source": source,
                "tokenizer": tokenizer,
            }
        )
        space = self.space
        if isinstance(space, str) and (base_dir / space).is_file():
            space = absolute(space)
        return self.model_copy(
            update={"pool": pool, "space": space, "fitness": self.fitness.resolved(base_dir)}
        )


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    check_file_size(path, "config")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:  # a folder, unreadable, not text
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UserError(f"cannot read config file {str(path)!r} ({why})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{where}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    config = validate_model(RunConfig, data, str(path)).resolved(path.resolve().parent)
    from evomerge.merging.preflight import pool_vocabulary_problem

    refs = [config.pool.base, *config.pool.models.values()]
    problem = None if config.pool.vocabulary() else pool_vocabulary_problem(refs)
    if problem:
        raise UserError(f"{path}: {problem}")
    return config
