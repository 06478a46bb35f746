"""Build the lm-eval tasks of a fitness config once: local task folders, names, subsets.

lm-eval resolves relative `data_files` against the process's working directory. So that a task
folder works from anywhere, its YAMLs are copied into the run folder with those paths made
absolute (relative to the YAML that names them), and the copies are what lm-eval indexes. The
copies also point the datasets cache into the run folder. Only PyYAML and lm-eval's public
`TaskManager` are used.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from evomerge.errors import UserError
from evomerge.fitness.config import FitnessConfig, SubsetConfig, TaskSpec

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")

# ----------------------------------------------------------------------------- YAML copies


class _Tagged:
    """A YAML node with a custom tag (lm-eval's `!function`), kept verbatim on the way through."""

    def __init__(self, tag: str, value: Any):
        self.tag, self.value = tag, value


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


def _construct_tagged(loader: yaml.Loader, suffix: str, node: yaml.Node) -> _Tagged:
    if isinstance(node, yaml.ScalarNode):
        return _Tagged(node.tag, loader.construct_scalar(node))
    if isinstance(node, yaml.SequenceNode):
        return _Tagged(node.tag, loader.construct_sequence(node, deep=True))
    return _Tagged(node.tag, loader.construct_mapping(node, deep=True))


def _represent_tagged(dumper: yaml.Dumper, data: _Tagged) -> yaml.Node:
    if isinstance(data.value, list):
        return dumper.represent_sequence(data.tag, data.value)
    if isinstance(data.value, dict):
        return dumper.represent_mapping(data.tag, data.value)
    return dumper.represent_scalar(data.tag, data.value)


_Loader.add_multi_constructor("!", _construct_tagged)
_Dumper.add_representer(_Tagged, _represent_tagged)


def _absolute(value: Any, base: Path) -> Any:
    """`value` (a path, or a list/dict of them) with relative local paths made absolute."""
    if isinstance(value, str):
        if "://" in value or Path(value).is_absolute():
            return value
        return str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def split_names(cfg: dict) -> set[str]:
    """The dataset splits a task YAML names: its data_files keys and its *_split fields."""
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    names = set(data_files) if isinstance(data_files, dict) else set()
    names |= {
        cfg[key]
        for key in ("training_split", "validation_split", "test_split")
        if isinstance(cfg.get(key), str)
    }
    return names


def _score_split(cfg: dict, splits: tuple[str, str], scored: str) -> None:
    """Make lm-eval score `scored` (one of the pair `splits`, dev and test) in a task that has
    both: lm-eval scores a task's `test_split` when it has one, so that is what is set."""
    if set(splits) <= split_names(cfg):
        cfg["test_split"] = scored
        if cfg.get("validation_split") == scored:
            cfg["validation_split"] = None  # scored already; not also the few-shot pool


def _rewrite_yaml(
    src: Path, dst: Path, cache_dir: Path, splits: tuple[str, str], scored: str
) -> None:
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"task file {src} is not UTF-8 text (lm-eval reads task YAMLs as UTF-8); "
            "re-save it as UTF-8"
        ) from None
    cfg = yaml.load(text, Loader=_Loader)
    if not isinstance(cfg, dict):
        shutil.copyfile(src, dst)
        return
    _score_split(cfg, splits, scored)
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                kwargs[key] = _absolute(kwargs[key], src.parent)
    path = cfg.get("dataset_path")
    if isinstance(path, str) and (src.parent / path).exists() and not Path(path).is_absolute():
        cfg["dataset_path"] = str((src.parent / path).resolve())
    if "dataset_path" in cfg or isinstance(kwargs, dict):
        cfg["dataset_kwargs"] = {**(kwargs or {}), "cache_dir": str(cache_dir)}
    dst.write_text(
        f"# copied from {src} by evomerge (data paths made absolute)\n"
        + yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )


def copy_task_paths(
    task_paths: list[Path],
    dest: Path,
    cache_dir: Path,
    *,
    splits: tuple[str, str] = ("dev", "test"),
    scored: str = "dev",
) -> list[Path]:
    """Copy each task folder (or YAML file) under `dest` with absolute data paths; return copies.

    A task with both splits of `splits` (dev, test) is set to score `scored`. Python files are
    copied too, so `!function module.name` keeps working next to its YAML.
    """
    copies = []
    for i, src in enumerate(task_paths):
        src = _existing(Path(src).resolve())
        target = dest / f"{i}-{src.stem}"
        # Built aside and renamed into place: workers starting together on one run folder must
        # not delete the copy another one is reading.
        dest.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=dest))
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        root = src.parent if src.is_file() else src
        for f in files:
            out = fresh / f.relative_to(root)
            out.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix in YAML_SUFFIXES:
                try:
                    _rewrite_yaml(f, out, cache_dir, splits, scored)
                except yaml.YAMLError as exc:
                    raise UserError(f"task file {f} is not valid YAML: {exc}") from None
            elif f.suffix == ".py":
                shutil.copyfile(f, out)
        _put_in_place(fresh, target)
        copies.append(target)
    return copies


def _put_in_place(fresh: Path, target: Path) -> None:
    """Rename the folder `fresh` to `target`; an identical `target` (another worker's) is kept."""
    try:
        fresh.rename(target)
        return
    except OSError:  # target exists and is not empty
        pass
    if _tree_bytes(fresh) == _tree_bytes(target):
        shutil.rmtree(fresh)
        return
    stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
    target.rename(stale / "copy")
    fresh.rename(target)
    shutil.rmtree(stale, ignore_errors=True)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- task set


@dataclasses.dataclass
class TaskSet:
    """The built lm-eval tasks of a fitness config, ready for repeated `evaluate` calls."""

    specs: list[TaskSpec]
    """The configured tasks, each metric made explicit (`acc`, `exact_match,strict-match`)."""
    task_dict: dict[str, Any]
    """What `TaskManager.load` returned: {"tasks": {name: Task}, "groups": ..., ...}."""
    maximize: dict[str, bool]
    """Per spec name: whether a larger metric is better."""
    n_docs: dict[str, int]
    """Per leaf task: how many examples the full set has."""
    subset: dict[str, list[int]] | None
    """Per leaf task: the fixed example indices of the subset (None: no subset configured)."""
    scored_split: dict[str, str] = dataclasses.field(default_factory=dict)
    """Per leaf task: the split lm-eval scores."""
    held_out: dict[str, bool] = dataclasses.field(default_factory=dict)
    """Per leaf task: whether it has both a dev and a test split (else one split serves both)."""

    @property
    def leaf_tasks(self) -> dict[str, Task]:
        return self.task_dict["tasks"]


def _manager(paths: list[Path], *, defaults: bool) -> TaskManager:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=defaults)


def local_task_names(task_paths: list[Path]) -> list[str]:
    """The tasks (not groups or tags) that the YAMLs under `task_paths` define, as lm-eval
    indexes them, without importing any `!function` code: named when a user names none."""
    return _manager([_existing(Path(p)) for p in task_paths], defaults=False).all_subtasks


def _existing(task_path: Path) -> Path:
    if not task_path.exists():
        raise UserError(f"task path {task_path} does not exist.")
    return task_path


def _unknown(name: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; check --task-path and the name."
    return UserError(f"unknown lm-eval task {name!r}{hint}")


def subset_indices(subset: SubsetConfig, task_name: str, n_docs: int) -> list[int]:
    """The fixed example indices of one task's subset: the first k, or a seeded sample of k."""
    k = subset.size_of(n_docs)
    if subset.sampling == "first":
        return list(range(k))
    rng = random.Random(f"{subset.seed}-{task_name}")
    return sorted(rng.sample(range(n_docs), k))


def _resolve(spec: TaskSpec, task: Task) -> tuple[TaskSpec, bool]:
    """`spec` with its metric made explicit (`metric,filter`), and whether larger is better."""
    reported = task.higher_is_better()
    filters = [f["name"] for f in task.config.filter_list] if task.config.filter_list else ["none"]
    metric, _, filter_name = (spec.metric or "").partition(",")
    if not metric:
        if len(reported) == 1:
            metric = next(iter(reported))
        elif "acc" in reported:
            metric = "acc"
        else:
            raise UserError(
                f"task {spec.name!r} reports several metrics ({', '.join(sorted(reported))}); "
                "name the one that counts, e.g. "
                f"{{name: {spec.name}, metric: {sorted(reported)[0]}}}."
            )
    if metric not in reported:
        raise UserError(
            f"task {spec.name!r} has no metric {metric!r}; it reports "
            f"{', '.join(sorted(reported)) or 'none'}."
        )
    if not filter_name:
        if "none" not in filters and len(filters) > 1:
            raise UserError(
                f"task {spec.name!r} filters its answers several ways ({', '.join(filters)}); "
                f"name one, e.g. metric: {metric},{filters[0]}."
            )
        filter_name = "none" if "none" in filters else filters[0]
    elif filter_name not in filters:
        raise UserError(
            f"task {spec.name!r} has no filter {filter_name!r}; it has {', '.join(filters)}."
        )
    key = metric if filter_name == "none" else f"{metric},{filter_name}"
    if spec.direction != "auto":
        maximize = spec.direction == "maximize"
    else:
        maximize = bool(reported[metric]) if reported[metric] is not None else True
    return spec.model_copy(update={"metric": key}), maximize


FEWSHOT_SEED = 1234
"""lm-eval's default `fewshot_random_seed`."""


def build_task_set(config: FitnessConfig, run_dir: Path, *, split: str = "dev") -> TaskSet:
    """Index and build every task of `config` once (local tasks first, built-ins only if needed).

    `split` is the role, "dev" (the search) or "test" (the report): tasks with both splits
    score `config.dev_split` or `config.test_split`."""
    run_dir = Path(run_dir)
    splits = (config.dev_split, config.test_split)
    scored = config.dev_split if split == "dev" else config.test_split
    copies = copy_task_paths(
        config.task_paths,
        run_dir / ("tasks" if split == "dev" else f"tasks-{split}"),
        run_dir / "hf" / "datasets",
        splits=splits,
        scored=scored,
    )
    names = [t.name for t in config.tasks]
    manager = _manager(copies, defaults=False)
    if any(n not in manager.all_tasks for n in names):
        # Indexing lm-eval's ~15k built-in tasks takes ~20 s: only when a name needs it.
        log.info("indexing lm-eval's built-in tasks for %s", ", ".join(names))
        manager = _manager(copies, defaults=True)
    for name in names:
        if name not in manager.all_tasks:
            raise _unknown(name, manager.all_tasks)

    try:
        task_dict = manager.load(names)
    except FileNotFoundError as exc:
        raise UserError(f"task data not found: {exc}") from None
    except ConnectionError as exc:
        raise UserError(f"task data is not reachable offline: {exc}") from None
    except StopIteration:  # `datasets` finding no row to read the schema from
        raise UserError(
            f"the data of task(s) {', '.join(names)} has an empty file; give every split "
            "at least one example"
        ) from None

    leaves = task_dict["tasks"]
    for task in leaves.values():
        # few-shot examples drawn as `simple_evaluate` draws them (its fewshot_random_seed):
        # the same shots in every build, so dev, test and a resumed run see the same prompts
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    specs, maximize = [], {}
    for spec in config.tasks:
        if spec.name not in leaves:
            kind = "a group" if spec.name in task_dict.get("groups", {}) else "a tag"
            raise UserError(f"{spec.name!r} is {kind}, not a task; list its tasks one by one.")
        resolved, maximize[spec.name] = _resolve(spec, leaves[spec.name])
        specs.append(resolved)

    n_docs = {name: len(task.eval_docs) for name, task in leaves.items()}
    empty = [name for name, n in n_docs.items() if n == 0]
    if empty:  # nothing to score: a fitness of 0/0
        raise UserError(
            f"task {empty[0]!r} has no examples in the split it scores ({scored}); "
            "check its data files"
        )
    subset = None
    if config.subset is not None:
        subset = {name: subset_indices(config.subset, name, n) for name, n in n_docs.items()}
    return TaskSet(
        specs=specs,
        task_dict=task_dict,
        maximize=maximize,
        n_docs=n_docs,
        subset=subset,
        scored_split={
            name: task.config.test_split or task.config.validation_split
            for name, task in leaves.items()
        },
        held_out={
            name: set(splits) <= set(getattr(task.dataset, "keys", list)())
            for name, task in leaves.items()
        },
    )
