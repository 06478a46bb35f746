"""`evomerge eval MODEL`: score a model folder (or a merge recipe) on lm-eval tasks."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click

from evomerge.cli.process import threads_help
from evomerge.errors import UserError


def _more_task_names(ctx: click.Context, param: click.Parameter, words: tuple[str, ...]) -> None:
    """`--tasks a b c` as the README writes it: an option takes one value, so click leaves `b`
    and `c` as positional words, which join the names `--tasks` took."""
    ctx.params["task_args"] = (*ctx.params.get("task_args", ()), *words)


@click.command("eval")
@click.argument(
    "model", metavar="MODEL_DIR|BASE+ADAPTER|RECIPE.yaml", type=click.Path(path_type=Path)
)
@click.argument(
    "more_tasks", nargs=-1, metavar="[TASKS]...", expose_value=False, callback=_more_task_names
)
@click.option(
    "--tasks",
    "task_args",
    multiple=True,
    metavar="NAME[:METRIC[:WEIGHT]]...",
    help="Tasks to score: the names up to the next option (so MODEL_DIR goes first), "
    "comma-separated or repeated (default: the --config's tasks; task YAMLs can run code, so "
    "only named tasks are loaded).",
)
@click.option(
    "--task-path",
    "task_paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Folder of lm-eval task YAMLs (repeatable; default: the repo's eval_tasks/).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A fitness config YAML (or a search config with a `fitness:` block).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), help="Score only the first N examples of each task."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help=threads_help())
@click.option(
    "--chat-template/--no-chat-template",
    "chat_template",
    default=None,
    help="Wrap prompts in the model's chat template, as lm-eval's --apply_chat_template "
    "(instruct and chat models; default: the --config's fitness.apply_chat_template, else off).",
)
@click.option(
    "--system-instruction",
    metavar="TEXT",
    help="A system message before each prompt (lm-eval's --system_instruction).",
)
@click.option(
    "--fewshot-as-multiturn",
    is_flag=True,
    default=None,
    help="With the chat template, few-shot examples as earlier turns (lm-eval's flag).",
)
@click.option(
    "--split",
    type=click.Choice(["dev", "test"]),
    default="dev",
    show_default=True,
    help="Which split of tasks that have both to score: dev (what a search scores) or test.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for task copies and dataset caches (default: a temporary one).",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the scores as JSON here.",
)
def command(
    model,
    task_args,
    task_paths,
    config_path,
    limit,
    batch_size,
    threads,
    chat_template,
    system_instruction,
    fewshot_as_multiturn,
    split,
    run_dir,
    out_path,
) -> None:
    """Score MODEL_DIR (a Hugging Face folder, BASE+ADAPTER: a base with a PEFT LoRA adapter
    applied, or a merge RECIPE.yaml) on lm-eval tasks.

    Prints each task's score and the combined fitness; --out also writes them as JSON.
    """
    from evomerge.merging.recipe import load_recipe

    recipe = load_recipe(model) if model.is_file() else None  # its mistakes before any work
    config = _fitness_config(config_path, task_paths, task_args, limit, batch_size)
    chat = {
        "apply_chat_template": chat_template,
        "system_instruction": system_instruction,
        "fewshot_as_multiturn": fewshot_as_multiturn,
    }
    if any(v is not None for v in chat.values()):
        from evomerge.merging.recipe import validate_model

        data = config.model_dump() | {k: v for k, v in chat.items() if v is not None}
        config = validate_model(type(config), data, str(config_path or "evomerge eval"))
    if out_path:  # before the evaluation, not after it
        from evomerge.io.output import check_writable

        check_writable(out_path, "--out")

    with tempfile.TemporaryDirectory(prefix="evomerge-eval-") as tmp:
        work = Path(run_dir) if run_dir else Path(tmp)
        from evomerge.cli.process import set_up_process

        set_up_process(
            threads=threads, hf_home=work / "hf", offline=config.offline
        )  # before lm-eval loads
        from evomerge.cli.process import quiet_output
        from evomerge.fitness import Evaluator
        from evomerge.fitness.live_model import load_live_model
        from evomerge.merging.executor import run_merge

        # a recipe is merged with the same code as `evomerge merge`, into the temporary folder
        folder = run_merge(recipe, Path(tmp) / "merged").out_dir if recipe else model
        # lm-eval's progress bars and its warnings about the already-loaded model, which the
        # user cannot act on, go to the run folder's log (`-v` keeps them on the terminal)
        with quiet_output(work):
            lm_model, tokenizer = load_live_model(folder)
            evaluator = Evaluator(lm_model, tokenizer, config, work, split=split)
            result = evaluator.score(full=limit is None)

    click.echo(_table(result, evaluator.tasks.specs, evaluator.tasks.maximize))
    from evomerge.fitness.zeros import all_zero_tasks, zero_warning

    zeros = all_zero_tasks([result.per_task], evaluator.tasks.maximize)
    if zeros:
        click.echo("warning: " + zero_warning(zeros, who="the model scored"), err=True)
    if out_path:
        report = {
            "model": str(model.resolve()),
            "tasks": [t.model_dump() for t in config.tasks],
            "maximize": evaluator.tasks.maximize,
            **result.to_dict(),
        }
        from evomerge.io.output import write_text_atomic

        try:  # whole or not at all; a full disk is one sentence (the scores are printed above)
            write_text_atomic(out_path, json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise UserError(f"writing {out_path} failed ({exc.strerror or exc})") from None
        click.echo(f"wrote {out_path}")


def _fitness_config(config_path, task_paths, task_args, limit, batch_size):
    """The FitnessConfig of a --config file with the command line's choices on top."""
    from evomerge.fitness.config import FitnessConfig
    from evomerge.fitness.tasks import local_task_names
    from evomerge.merging.recipe import validate_model
    from evomerge.pool import repo_task_dir

    data = _fitness_block(config_path) if config_path else {}
    if task_paths:
        data["task_paths"] = [p.resolve() for p in task_paths]
    elif "task_paths" not in data and (default := repo_task_dir()) is not None:
        data["task_paths"] = [default]
    names = [t.strip() for arg in task_args for t in arg.split(",") if t.strip()]
    if names:
        data["tasks"] = [_parse_task(t) for t in names]
    elif "tasks" not in data:
        raise _name_the_tasks(local_task_names(data.get("task_paths", [])))
    if limit is not None:
        data["subset"] = {"count": limit, "sampling": "first"}
    data.setdefault("batch_size", batch_size)
    return validate_model(FitnessConfig, data, str(config_path or "evomerge eval"))


def _name_the_tasks(available: list[str]) -> UserError:
    """No task named: a task YAML's `!function` imports Python from its folder, so loading
    every task of a folder would run code the user never asked for (the index lists names
    without importing anything)."""
    found = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
    where = f" (the task path has {found})" if available else ""
    return UserError(
        f"no tasks named; pass --tasks NAME or a --config with tasks{where}: task YAMLs can "
        "run code, so evomerge eval loads only the tasks it is given"
    )


def _fitness_block(path: Path) -> dict[str, Any]:
    """The mapping of a fitness config file, or of the `fitness:` block of a search config."""
    import yaml

    from evomerge.merging.recipe import check_file_size

    check_file_size(path, "config")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read fitness config {path}: {exc}") from None
    if isinstance(data, dict) and "fitness" in data:
        data = data["fitness"]
    if not isinstance(data, dict):
        raise UserError(f"{path} holds no fitness config (a mapping with a `tasks` list).")
    if isinstance(data.get("task_paths"), list):  # relative to the file, as in a search config
        data["task_paths"] = [(path.parent / str(p)).resolve() for p in data["task_paths"]]
    return data


def _parse_task(text: str) -> dict[str, Any]:
    """`name`, `name:metric` or `name:metric:weight` -> a TaskSpec dict."""
    parts = text.split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"bad task {text!r}; write NAME, NAME:METRIC or NAME:METRIC:WEIGHT.")
    spec: dict[str, Any] = {"name": parts[0]}
    if len(parts) > 1 and parts[1]:
        spec["metric"] = parts[1]
    if len(parts) > 2:
        spec["weight"] = parts[2]  # FitnessConfig says so if it is not a number
    return spec


def _table(result, specs, maximize) -> str:
    rows = [("task", "metric", "weight", "better", "score", "examples")]
    for spec in specs:
        n = result.n_examples.get(spec.name)
        rows.append(
            (
                spec.name,
                spec.metric,
                f"{spec.weight:g}",
                "higher" if maximize[spec.name] else "lower",
                f"{result.per_task[spec.name]:.4f}",
                "" if n is None else str(n),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"fitness (weighted, larger is better): {result.value:.4f}")
    return "\n".join(lines)
