"""`evomerge eval`: the README's command runs as written, `--tasks` takes several names, and
mistakes get the library's own messages (closest task name, model folder checks)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def evomerge(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def readme_eval_commands() -> list[str]:
    """The README's `evomerge eval MODEL_DIR ...` lines (on the demo pool), comments cut off;
    tests/test_readme.py runs every other command block in a sandbox of the reader's files."""
    commands, in_block = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and line.startswith("evomerge eval MODEL_DIR "):
            commands.append(line.split("#", 1)[0].strip())
    return commands


def task_names_given(*args: str) -> tuple[str, ...]:
    """What `--tasks` collects from a command line (click's parsing only; nothing runs)."""
    from evomerge.cli.eval_cmd import command

    return command.make_context("eval", list(args)).params["task_args"]


def test_tasks_take_several_names_as_the_readme_writes_them():
    assert task_names_given("m", "--tasks", "a", "b:acc", "c:perplexity:0.5", "--limit", "3") == (
        "a",
        "b:acc",
        "c:perplexity:0.5",
    )
    assert task_names_given("m", "--tasks", "a", "--tasks", "b") == (
        "a",
        "b",
    )  # repeated, as before
    assert task_names_given("m", "--tasks", "a,b", "--limit", "2", "--tasks", "c") == ("a,b", "c")
    assert task_names_given("--tasks", "a", "--", "m") == ("a",)  # `--` ends the names


@pytest.mark.slow
def test_the_readme_eval_command_runs_on_the_demo_pool(small_pool):
    """The README's own command, once refused by click ("Got unexpected extra argument")."""
    commands = readme_eval_commands()
    assert commands, "the README shows no `evomerge eval` command"
    for line in commands:
        words = (
            line.replace("MODEL_DIR", str(small_pool / "add"))
            .replace("runs/demo-pool", str(small_pool))
            .split()
        )
        result = evomerge(*words[1:])
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
        for name in words[words.index("--tasks") + 1 :]:
            if name.startswith("-"):
                break
            assert re.search(rf"^{name.split(':')[0]}\s", result.stdout, re.MULTILINE), (
                result.stdout
            )


@pytest.mark.slow
def test_a_misspelled_task_gets_the_closest_names(small_pool):
    result = evomerge(
        "eval",
        str(small_pool / "add"),
        "--task-path",
        str(small_pool / "tasks"),
        "--tasks",
        "evomerge_ad",
        "evomerge_rev",
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: unknown lm-eval task 'evomerge_ad'; did you mean evomerge_add")
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: tmp, "contains no .safetensors"),
    ],
    ids=["missing", "not-a-model"],
)
def test_a_bad_model_folder_is_the_library_sentence(tmp_path, make, needle):
    result = evomerge("eval", str(make(tmp_path)), "--tasks", "evomerge_add")
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip()] and needle in result.stderr
    ), result.stderr


def test_a_config_file_task_paths_are_relative_to_it_and_its_tasks_are_the_default(
    small_pool, tmp_path
):
    """No --tasks: the tasks the config names, found under its task path (relative to it)."""
    shutil.copytree(small_pool / "tasks", tmp_path / "cfg" / "tasks")
    (tmp_path / "cfg" / "fitness.yaml").write_text(
        "fitness:\n  task_paths: [tasks]\n  tasks: [evomerge_add, evomerge_rev, evomerge_sort]\n"
    )
    out = tmp_path / "scores.json"
    result = evomerge(
        "eval",
        str(small_pool / "rev"),
        "--config",
        str(tmp_path / "cfg" / "fitness.yaml"),
        "--limit",
        "2",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["n_examples"] == {
        "evomerge_add": 2,
        "evomerge_rev": 2,
        "evomerge_sort": 2,
    }
