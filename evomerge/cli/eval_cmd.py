"""`evomerge eval MODEL`: score a model folder (or a merge recipe) on lm-eval tasks."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from evomerge.errors import UserError

log = logging.getLogger(__name__)


def _parse_task(text: str) -> dict[str, Any]:
    """`name`, `name:metric` or `name:metric:weight` -> a TaskSpec dict."""
    parts = text.split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"bad task {text!r}; write NAME, NAME:METRIC or NAME:METRIC:WEIGHT.")
    spec: dict[str, Any] = {"name": parts[0]}
    if len(parts) > 1 and parts[1]:
        spec["metric"] = parts[1]
    if len(parts) > 2:
        try:
            spec["weight"] = float(parts[2])
        except ValueError:
            raise UserError(f"bad weight in task {text!r}; it must be a number.") from None
    return spec


def _tasks_in(paths: list[Path]) -> list[str]:
    """Names of the tasks defined by the YAML files under `paths` (for the default task list)."""
    import yaml

    from evomerge.fitness.tasks import YAML_SUFFIXES

    names = []
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for f in files:
            if f.suffix not in YAML_SUFFIXES:
                continue
            try:
                # `!function` tags are irrelevant here: only the top-level `task` key is read.
                text = "\n".join(line for line in f.read_text().splitlines() if "!function" not in line)
                cfg = yaml.safe_load(text)
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
                names.append(cfg["task"])
    return names


def _load_fitness_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read fitness config {path}: {exc}") from None
    if isinstance(data, dict) and "fitness" in data:
        data = data["fitness"]
    if not isinstance(data, dict):
        raise UserError(f"{path} holds no fitness config (a mapping with a `tasks` list).")
    paths = [Path(p) for p in data.get("task_paths", [])]
    data["task_paths"] = [p if p.is_absolute() else path.parent / p for p in paths]
    return data


def _load_model(model_dir: Path):
    """A model folder -> (model, tokenizer); safetensors only, never remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model folder (no config.json).")
    if not any(model_dir.glob("*.safetensors")):
        raise UserError(f"{model_dir} has no .safetensors weights; only safetensors are loaded.")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, use_safetensors=True, trust_remote_code=False, dtype="auto"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return model, tokenizer


def _merge_recipe(recipe_path: Path, into: Path) -> Path:
    """Merge a recipe into a temporary folder with the same code as `evomerge merge`."""
    from evomerge.merge import run_merge
    from evomerge.recipe import load_recipe

    out = into / "merged"
    run_merge(load_recipe(recipe_path), out)
    return out


def _table(result, specs, maximize) -> str:
    rows = [("task", "metric", "weight", "better", "score", "examples")]
    for spec in specs:
        n = result.n_examples.get(spec.name)
        rows.append((
            spec.name, spec.metric, f"{spec.weight:g}",
            "higher" if maximize[spec.name] else "lower",
            f"{result.per_task[spec.name]:.4f}", "" if n is None else str(n),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"fitness (weighted, larger is better): {result.value:.4f}")
    return "\n".join(lines)


@click.command("eval")
@click.argument("model", metavar="MODEL_DIR|RECIPE.yaml", type=click.Path(path_type=Path))
@click.option(
    "--tasks", "task_args", multiple=True,
    help="NAME[:METRIC[:WEIGHT]], comma-separated or repeated (default: every task under "
    "--task-path).",
)
@click.option(
    "--task-path", "task_paths", multiple=True, type=click.Path(path_type=Path),
    help="Folder of lm-eval task YAMLs (repeatable; default: the repo's eval_tasks/).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A fitness config YAML (or a search config with a `fitness:` block).")
@click.option("--limit", type=int, help="Score only the first N examples of each task.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for task copies and dataset caches (default: a temporary one).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the scores as JSON here.")
def command(model, task_args, task_paths, config_path, limit, batch_size, threads, run_dir,
            out_path) -> None:
    """Score MODEL_DIR (a Hugging Face folder, or a merge RECIPE.yaml) on lm-eval tasks.

    Prints each task's score and the combined fitness; --out also writes them as JSON.
    """
    from pydantic import ValidationError

    from evomerge.fitness.config import FitnessConfig
    from evomerge.pool import repo_task_dir

    if not model.exists():
        raise UserError(f"{model} does not exist.")
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1.")

    data: dict[str, Any] = _load_fitness_config(config_path) if config_path else {}
    if task_paths:
        data["task_paths"] = list(task_paths)
    elif "task_paths" not in data and (default := repo_task_dir()) is not None:
        data["task_paths"] = [default]
    names = [t.strip() for arg in task_args for t in arg.split(",") if t.strip()]
    if names:
        data["tasks"] = [_parse_task(t) for t in names]
    elif "tasks" not in data:
        data["tasks"] = _tasks_in([Path(p) for p in data.get("task_paths", [])])
        if not data["tasks"]:
            raise UserError("no tasks given; pass --tasks or a --task-path with task YAMLs.")
    if limit is not None:
        data["subset"] = {"count": limit, "sampling": "first"}
    data.setdefault("batch_size", batch_size)
    try:
        config = FitnessConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"bad fitness config at {where or 'top level'}: {first['msg']}.") from None

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    with tempfile.TemporaryDirectory(prefix="evomerge-eval-") as tmp:
        work = Path(run_dir) if run_dir else Path(tmp)
        from evomerge.cli.process import set_up_process

        set_up_process(hf_home=work / "hf", offline=config.offline)  # before lm-eval loads
        import torch

        from evomerge.fitness.evaluator import Evaluator

        torch.set_num_threads(threads)
        model_dir = model
        if model.is_file():
            model_dir = _merge_recipe(model, Path(tmp))
        lm_model, tokenizer = _load_model(model_dir)
        evaluator = Evaluator(lm_model, tokenizer, config, work)
        result = evaluator.score(full=limit is None)

    click.echo(_table(result, config.tasks, evaluator.tasks.maximize))
    if out_path:
        report = {
            "model": str(model.resolve()),
            "tasks": [t.model_dump() for t in config.tasks],
            "maximize": evaluator.tasks.maximize,
            **result.to_dict(),
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {out_path}")
