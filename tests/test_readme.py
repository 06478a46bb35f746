"""Every command block of the README runs as written.

The README is followed as a reader would follow it, in one sandbox folder and in the order it
is written:

- a fenced YAML block whose first line is `# PATH` (`# my-merge.yaml: ...`) is a file the reader
  writes: it is written to PATH in the sandbox, with the budget cuts of FILE_EDITS;
- what the README assumes the reader already has (their models, their task data, a checkout's
  `eval_tasks/` and `configs/`) is provided by USER_FILES, from the small demo pool;
- every line of every command block (```bash, ```sh, ```shell or a bare ```) is run with bash
  in the sandbox, with this checkout's `evomerge`, after replacing the PLACEHOLDERS; the lines
  of PARSE_ONLY (too slow, or needing hardware this machine lacks) are only parsed: their
  `evomerge` command lines by click, exactly as the real command would parse them, without
  running the command; `make` targets by `make -n`.

Every entry of these tables must match the README: an edit of the README that breaks a command
fails here, and so does an edit that leaves a table entry behind.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# What the reader fills in -> what stands for it in the sandbox.
PLACEHOLDERS = {
    "MODEL_DIR": "runs/demo-pool/add",
}

# Lines that are only parsed, each with the reason it is not run.
PARSE_ONLY = {
    "make demo": "installs the venv and runs the full demo (minutes)",
    "make test": "the whole test suite",
    "evomerge pool demo runs/demo-pool": (
        "trains the full demo pool (100 s); the sandbox has the small pool there"
    ),
    "evomerge pool demo-lora runs/demo-lora-pool": (
        "trains the full LoRA pool (100 s); the sandbox has the small one there"
    ),
    (
        "for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i evomerge worker runs/shared --device cuda & "
        "done; wait"
    ): "needs 4 GPUs",
    "evomerge pool smol runs/smol-pool": (
        "downloads SmolLM2 and trains for minutes (the real-model lane, tests/test_real_model.py)"
    ),
    "evomerge search runs/smol-pool/search.yaml --run-dir runs/smol": "needs the smol pool",
    "evomerge report runs/smol": "needs the smol search",
    "evomerge export runs/smol runs/smol/best-merge": "needs the smol search",
}

# Files the README assumes the reader has: sandbox path -> where it comes from ("{pool}" is the
# small demo pool, "{lora_pool}" the small demo-lora pool). Folders of models are linked, task and
# config folders copied (their relative paths must resolve inside the sandbox).
USER_FILES = {
    "models/base": "{pool}/base",
    "models/math": "{pool}/add",
    "models/code": "{pool}/sort",
    "my_tasks/data/my_skill.jsonl": "{pool}/tasks/data/add_test.jsonl",
    "my_tasks/data/my_skill_dev.jsonl": "{pool}/tasks/data/add_dev.jsonl",
    "runs/demo-pool": "{pool}",
    "runs/demo-lora-pool": "{lora_pool}",
    "eval_tasks": f"{ROOT}/eval_tasks",
    "configs": f"{ROOT}/configs",
}
LINKED = {"models/base", "models/math", "models/code", "runs/demo-pool", "runs/demo-lora-pool"}

# Budget cuts, so each search takes seconds: file -> [(text, replacement)].
FILE_EDITS = {
    "configs/demo.yaml": [("trials: 40", "trials: 3")],
    "configs/demo-lora.yaml": [("trials: 40", "trials: 3")],
    "my-search.yaml": [("trials: 40", "trials: 4")],
}

COMMAND_LANGUAGES = {"bash", "sh", "shell", ""}


# --- reading the README ------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    text: str


@dataclass(frozen=True)
class Command:
    line: int
    text: str  # as written, without its trailing comment


def fenced_blocks(markdown: str) -> list[Block]:
    """Every fenced code block (also indented ones, as in list items)."""
    blocks, lines = [], markdown.split("\n")
    fence = re.compile(r"^(\s*)```(\S*)\s*$")
    i = 0
    while i < len(lines):
        opening = fence.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, body, j = len(opening.group(1)), [], i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            body.append(lines[j][indent:])
            j += 1
        blocks.append(Block(i + 1, opening.group(2), "\n".join(body)))
        i = j + 1
    return blocks


def readme_files(blocks: list[Block]) -> dict[str, str]:
    """The files the README tells the reader to write: YAML blocks headed `# PATH`."""
    files = {}
    for block in blocks:
        first = block.text.split("\n", 1)[0]
        named = re.match(r"^# (\S+\.ya?ml)\b", first)
        if block.language in ("yaml", "yml") and named:
            files[named.group(1)] = block.text
    return files


def readme_commands(blocks: list[Block]) -> list[Command]:
    commands = []
    for block in blocks:
        if block.language not in COMMAND_LANGUAGES:
            continue
        for offset, line in enumerate(block.text.replace("\\\n", " ").split("\n")):
            text = re.sub(r"\s+#.*$", "", line).strip()  # no `#` inside quotes in the README
            if text:
                commands.append(Command(block.line + 1 + offset, text))
    return commands


BLOCKS = fenced_blocks(README.read_text())
COMMANDS = readme_commands(BLOCKS)
FILES = readme_files(BLOCKS)


# --- parsing without running ---------------------------------------------------------------------
def evomerge_invocations(text: str) -> list[list[str]]:
    """The argument lists of every `evomerge` in a shell line (`a; b & c`, loops, VAR=x
    prefixes)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens, invocations, current = list(lexer), [], None
    for token in tokens:
        if token in (";", "&", "&&", "|", "||", "(", ")"):
            current = None
        elif current is not None:
            current.append(token)
        elif token == "evomerge":
            current = []
            invocations.append(current)
    return invocations


def parse_evomerge(args: list[str]) -> None:
    """Parse `evomerge ARGS` exactly as the CLI would (commands, options, argument counts), without
    running the command; a click error (unknown option, extra argument, ...) propagates."""
    from evomerge.cli import cli

    command, ctx, rest = cli, click.Context(cli, info_name="evomerge"), list(args)
    while isinstance(command, click.Group):
        if not rest or rest[0].startswith("-"):
            raise click.UsageError(f"expected a command name, got {rest[:1]}")
        name, rest = rest[0], rest[1:]
        sub = command.get_command(ctx, name)
        if sub is None:
            raise click.UsageError(f"no such command {name!r}")
        command, ctx = sub, click.Context(sub, info_name=name, parent=ctx)
    command.make_context(ctx.info_name, rest, parent=ctx.parent)


def parse_only(command: Command) -> None:
    words = shlex.split(command.text)
    if words[0] == "make":
        done = subprocess.run(
            ["make", "-n", "-C", str(ROOT), *words[1:]], capture_output=True, text=True
        )
        assert done.returncode == 0, f"README line {command.line}: `{command.text}`: {done.stderr}"
        return
    invocations = evomerge_invocations(command.text)
    assert invocations, (
        f"README line {command.line}: `{command.text}` has no evomerge command to check"
    )
    for args in invocations:
        try:
            parse_evomerge([substituted(a) for a in args])
        except click.ClickException as exc:
            pytest.fail(f"README line {command.line}: `{command.text}`: {exc.format_message()}")


def substituted(text: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = re.sub(rf"(?<![\w.]){re.escape(placeholder)}(?![\w.])", value, text)
    return text


# --- the sandbox -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, small_pool: Path, small_lora_pool: Path) -> dict:
    """A folder laid out as the README's reader has it, and an environment whose `evomerge` is
    this checkout's."""
    root = tmp_path_factory.mktemp("readme")
    for rel, source in USER_FILES.items():
        source, target = Path(source.format(pool=small_pool, lora_pool=small_lora_pool)), root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel in LINKED:
            target.symlink_to(source, target_is_directory=source.is_dir())
        elif source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for rel, edits in FILE_EDITS.items():
        path = root / rel
        text = path.read_text()
        for old, new in edits:
            text = text.replace(old, new)
        path.write_text(text)

    bin_dir = root / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "evomerge"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m evomerge "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    return {"root": root, "env": env}


# --- the tests ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"L{c.line}:{c.text[:60]}" for c in COMMANDS])
def test_readme_command(command: Command, sandbox):
    if command.text in PARSE_ONLY:
        parse_only(command)
        return
    done = subprocess.run(
        ["bash", "-c", substituted(command.text)],
        cwd=sandbox["root"],
        env=sandbox["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"README line {command.line}: `{command.text}` exited "
        f"{done.returncode}:\n{done.stderr[-3000:]}"
    )


def test_every_command_is_evomerge_or_make():
    """A command of another tool would run here unchecked against what it promises."""
    for command in COMMANDS:
        first = next(w for w in shlex.split(command.text) if "=" not in w)
        assert first in ("evomerge", "make", "for"), f"README line {command.line}: `{command.text}`"
        assert first != "for" or command.text in PARSE_ONLY, (
            f"README line {command.line}: loops are parse-only"
        )


def test_the_tables_match_the_readme():
    texts = {c.text for c in COMMANDS}
    assert set(PARSE_ONLY) <= texts, (
        f"PARSE_ONLY names lines the README no longer has: {set(PARSE_ONLY) - texts}"
    )
    for placeholder in PLACEHOLDERS:
        assert any(placeholder in t for t in texts), f"no README command uses {placeholder}"
    for rel, edits in FILE_EDITS.items():
        text = FILES.get(rel) or (ROOT / rel).read_text()
        for old, _ in edits:
            assert old in text, f"FILE_EDITS: {old!r} is not in {rel}"
    assert FILES, "the README has no YAML file for the reader to write"


def test_the_parser_catches_what_a_user_would_hit():
    """The parse-only check is the CLI's own parser: it refuses what the real command refuses."""
    for bad in (
        ["serch", "x.yaml"],
        ["merge", "only-one.yaml"],
        ["worker", "runs/x", "--devic", "cuda"],
    ):
        with pytest.raises(click.ClickException):
            parse_evomerge(bad)
    parse_evomerge(["worker", "runs/x", "--device", "cuda"])
    parse_evomerge(["pool", "demo", "runs/demo-pool"])
    assert evomerge_invocations(
        "for i in 0 1; do X=$i evomerge worker r --device cuda & done; wait"
    ) == [["worker", "r", "--device", "cuda"]]


# --- the method table ----------------------------------------------------------------------------
def method_table(markdown: str) -> dict[str, list[str]]:
    """The README's table of merge methods: each method named in a row's first cell (`a / b`
    names two with the same row) -> the row's other cells."""
    lines = markdown.split("\n")
    start = next(
        (i for i, line in enumerate(lines) if line.startswith("| method | inputs |")), None
    )
    assert start is not None, "the README has no table headed | method | inputs | ..."
    rows = {}
    for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2 :]):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.update({name.strip(): cells[1:] for name in cells[0].split(" / ")})
    return rows


def method_row(name: str) -> list[str]:
    """What the README's row says of a registered method: its inputs, then its per-model and
    its global parameters in declaration order, each with its default (a name alone: required,
    or no default); `—` for none."""
    from evomerge.methods import get_method

    method = get_method(name)
    low, high = method.min_models, method.max_models
    count = str(low) if low == high else f"{low} or more" if high is None else f"{low} to {high}"
    models = f"{count} model" + ("" if count == "1" else "s")
    inputs = {
        "input": f"{models} (a base counts as one)",
        "required": f"base + {models}",
        "optional": f"{models}, base optional",
    }[method.base_role]
    per_model = [p for p in method.params if p.per_model]
    shared = [p for p in method.params if not p.per_model]
    return [inputs, _params_cell(per_model), _params_cell(shared)]


def _params_cell(params) -> str:
    def text(param) -> str:
        if param.required or param.default is None:
            return param.name
        value = param.default
        if isinstance(value, bool):
            shown = str(value).lower()
        else:  # 1.0 -> 1, 1e-05 -> 1e-5
            shown = re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:g}")
        return f"{param.name}={shown}"

    return ", ".join(map(text, params)) or "—"


def test_the_method_table_matches_the_registry():
    """Every registered method has a row, every row a registered method, and each row says
    what the method declares: the table cannot go stale."""
    from evomerge.methods import method_names

    rows = method_table(README.read_text())
    assert set(rows) == set(method_names()), (
        f"README method table: missing {sorted(set(method_names()) - set(rows))}, "
        f"unknown {sorted(set(rows) - set(method_names()))}"
    )
    for name, cells in rows.items():
        expected = method_row(name)
        assert cells == expected, f"README method table, {name}: write | {' | '.join(expected)} |"
