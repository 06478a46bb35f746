"""A newcomer adds a space kind, a sampler or a fitness backend by writing one module and one
registration: each is checked on a copy of the package with that one addition, run in a fresh
interpreter (as `test_a_method_is_one_new_file` does for merge methods). And the README's
table of what each sampler can do is the registry's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import evomerge

PACKAGE = Path(evomerge.__file__).parent
README = PACKAGE.parent / "README.md"


def package_copy(tmp_path: Path) -> Path:
    shutil.copytree(PACKAGE, tmp_path / "evomerge", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "evomerge"


def run_in(tmp_path: Path, check: str) -> None:
    """Run `check` with the copy of the package first on the path; it fails on an assert."""
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(check)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evomerge" in done.stdout and str(tmp_path) in done.stdout  # the copy ran


CONFIG = """
from evomerge.search.config import RunConfig

def config(space, sampler="gp", backend="hf", objectives="combined"):
    return RunConfig.model_validate({
        "pool": {"base": "base", "models": {"m": "m"}},
        "space": space,
        "fitness": {"tasks": ["x"], "backend": backend},
        "search": {"sampler": sampler, "objectives": objectives},
    })

import evomerge
print(evomerge.__file__)
"""


def test_a_space_kind_is_one_new_sub_package(tmp_path):
    """A sub-package of evomerge.spaces that registers its kind: run configs may name it, the
    search builds its space and candidate, export decodes its trials, and what the kind allows
    (backends, categorical genes, hence samplers) is enforced, with nothing else edited."""
    kind = package_copy(tmp_path) / "spaces" / "halfway"
    kind.mkdir()
    (kind / "__init__.py").write_text(
        textwrap.dedent('''
        """A toy kind: how far from the base toward the one model, or a categorical jump."""
        from evomerge.spaces.base import Gene, suggest_genome
        from evomerge.spaces.registry import SpaceKind, register_kind

        class HalfwaySpace:
            kind, title = "halfway", "halfway"

            def __init__(self, data, where, *, base, models, dtype):
                self.base, self.model, self.dtype = base, next(iter(models.values())), dtype
                self.genes = [Gene("t", 0.0, 1.0, "all", None, None, "t")]
                if data.get("jump"):
                    self.genes.append(Gene("jump", 0, 0, "all", None, None, "jump", ("no", "yes")))
                self.groups = [("all", 0, 1)]

            def suggest(self, trial):
                return suggest_genome(trial, self.genes)

            def decode(self, genome):
                from evomerge.merging.multistage import Stage
                from evomerge.merging.recipe import Recipe

                t = genome["t"]
                models = [{"model": self.model, "parameters": {"weight": t}},
                          {"model": self.base, "parameters": {"weight": 1 - t}}]
                return [Stage(None, Recipe(merge_method="linear", models=models))]

            def baselines(self):
                return {"half": {"t": 0.5}}

        class HalfwayCandidate:
            def __init__(self, model, space, *, seed, device, dtype):
                self.applied = []

            def apply(self, genome):
                self.applied.append(genome)

        register_kind(SpaceKind("halfway", HalfwaySpace, HalfwayCandidate, categorical=True,
                                backends=("hf",), why_backends="a toy scores in memory"))
        ''')
    )
    run_in(
        tmp_path,
        CONFIG
        + """
from evomerge.errors import UserError
from evomerge.results.export import trial_stages
from evomerge.search.loop import make_candidate
from evomerge.search.run_folder import RunGenes, build_space

space = build_space(config({"kind": "halfway"}))
assert space.kind == "halfway" and RunGenes.of(space).method == "halfway"
candidate = make_candidate(None, space, config({"kind": "halfway"}))
candidate.apply(space.baselines()["half"])
assert candidate.applied == [{"t": 0.5}]


class Trial:
    params, user_attrs = {"t": 0.25}, {}


(stage,) = trial_stages(space, Trial)
assert stage.name is None and stage.recipe.models[0].parameters["weight"] == 0.25

for refused, needle in (
    (config({"kind": "halfway"}, backend="vllm"), "fitness.backend: hf"),
    (config({"kind": "halfway", "jump": True}, sampler="cmaes"), "use sampler gp, tpe"),
):
    try:
        build_space(refused)
    except UserError as exc:
        assert needle in str(exc), exc
    else:
        raise AssertionError("not refused")
build_space(config({"kind": "halfway", "jump": True}, sampler="tpe"))
""",
    )


def test_a_sampler_is_one_module_and_one_registration(tmp_path):
    """A module with the sampler and one `register_sampler` line: run configs may name it,
    studies get it, and what it cannot do (several objectives) is refused by the config."""
    package = package_copy(tmp_path)
    (package / "search" / "halton.py").write_text(
        '"""Quasi-random draws: Optuna\'s QMCSampler over a scrambled Halton sequence."""\n'
        "import optuna\n\n\n"
        "def make(seed, trials):\n"
        "    return optuna.samplers.QMCSampler(qmc_type='halton', scramble=True, seed=seed)\n"
    )
    with (package / "search" / "samplers.py").open("a") as table:
        table.write(
            "\nfrom evomerge.search import halton  # noqa: E402\n\n"
            "register_sampler(Sampler('halton', halton.make, categorical=False,"
            " objectives=False, warm_start=False))\n"
        )
    run_in(
        tmp_path,
        CONFIG
        + """
import optuna
from pydantic import ValidationError
from evomerge.search.samplers import able, make_sampler

assert config("dare_ties_layers", sampler="halton").search.sampler == "halton"
assert isinstance(make_sampler("halton", seed=0, trials=8), optuna.samplers.QMCSampler)
assert "halton" not in able("categorical")
try:
    config("dare_ties_layers", sampler="halton", objectives="per_task")
except ValidationError as exc:
    assert "the halton sampler optimises one objective" in str(exc), exc
else:
    raise AssertionError("not refused")
""",
    )


def test_a_backend_is_one_module_and_one_registration(tmp_path):
    """A module with make_lm, prepare and sync and one `register_backend` line: fitness configs
    may name it, the evaluator's seam builds and syncs through it, and a space kind that allows
    only some backends refuses it."""
    package = package_copy(tmp_path)
    (package / "fitness" / "echo_backend.py").write_text(
        textwrap.dedent('''
        """A toy backend that scores nothing and counts its syncs."""

        class EchoLM:
            def __init__(self, model):
                self.model, self.syncs = model, 0

        def make_lm(model, tokenizer, *, batch_size, max_length):
            return EchoLM(model)

        def prepare(lm, tasks):
            return sorted(tasks)

        def sync(lm):
            lm.syncs += 1
        ''')
    )
    with (package / "fitness" / "backends.py").open("a") as table:
        table.write(
            "\nfrom evomerge.fitness import echo_backend as _echo  # noqa: E402\n\n"
            "register_backend(Backend('echo', _echo.make_lm, _echo.prepare, _echo.sync))\n"
        )
    run_in(
        tmp_path,
        CONFIG
        + """
from evomerge.errors import UserError
from evomerge.fitness.backends import get_backend, make_lm
from evomerge.spaces.registry import get_kind

assert config("dare_ties_layers", backend="echo").fitness.backend == "echo"
backend = get_backend("echo")
lm = make_lm("echo", "model", None, batch_size=1, max_length=None)
assert backend.prepare(lm, {"b": 1, "a": 2}) == ["a", "b"]
backend.sync(lm)
assert lm.syncs == 1
try:
    get_kind("dataflow").check_backend("echo")
except UserError as exc:
    assert "score it with fitness.backend: hf" in str(exc)
else:
    raise AssertionError("not refused")
""",
    )


def test_the_readmes_sampler_table_is_the_registry():
    """README "Adding a merge method, a space kind, a sampler or a backend": one row per
    sampler, its capabilities as `SAMPLERS` declares them."""
    from evomerge.search.samplers import SAMPLERS

    text = README.read_text()
    rows = re.findall(r"^\| `(\w+)` \| (yes|no) \| (yes|no) \| (yes|no) \|", text, re.M)
    table = {name: tuple(cell == "yes" for cell in cells) for name, *cells in rows}
    assert table == {
        name: (s.categorical, s.objectives, s.warm_start) for name, s in SAMPLERS.items()
    }
