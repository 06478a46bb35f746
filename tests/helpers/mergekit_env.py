"""mergekit 0.1.5 in its own virtual environment, for golden comparisons and the benchmark.

mergekit pins its own dependency versions, so it never shares evomerge's environment. It lives
in `.venv-mergekit/` at the repository root (git-ignored) and is reached only through
subprocesses running `mergekit_driver.py`, which does many merges per process to pay mergekit's
~10 s start-up once.

Where the environment comes from, in order:
  1. EVOMERGE_MERGEKIT_PYTHON=/path/to/python — an existing mergekit environment;
  2. `.venv-mergekit/bin/python` if it exists;
  3. created now, if EVOMERGE_MERGEKIT=1 (this downloads torch and mergekit; set
     EVOMERGE_MERGEKIT_TORCH_INDEX to take torch from another index, e.g. its CPU wheels);
otherwise the mergekit tests are skipped with the reason from `mergekit_python_or_reason()`.

    python tests/helpers/mergekit_env.py  # create .venv-mergekit/ (what `make test` runs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV_DIR = REPO / ".venv-mergekit"
DRIVER = Path(__file__).resolve().parent / "mergekit_driver.py"
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"


def _python_in(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def create_env(env_dir: Path = ENV_DIR) -> Path:
    """Create the mergekit environment; returns its python. Torch first, at the version
    evomerge's own environment uses (so that both sides run the same kernels), then mergekit
    under the repository's constraints, which pin torch so that pip cannot move it."""
    python = _python_in(env_dir)
    if not python.exists():
        venv.EnvBuilder(with_pip=True, clear=False).create(env_dir)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # EVOMERGE_MERGEKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu avoids the CUDA wheels.
    index = os.environ.get("EVOMERGE_MERGEKIT_TORCH_INDEX")
    subprocess.run(
        [*pip, f"torch=={TORCH_VERSION}", *(["--index-url", index] if index else [])], check=True
    )
    subprocess.run(
        [*pip, "-c", str(REPO / "constraints.txt"), f"mergekit=={MERGEKIT_VERSION}"], check=True
    )
    _check_version(python)
    return python


def _check_version(python: Path) -> str | None:
    """None if `python` imports mergekit 0.1.5, else why not."""
    probe = "import importlib.metadata as m; print(m.version('mergekit'))"
    try:
        out = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run: {exc}"
    if out.returncode != 0:
        return f"{python} cannot import mergekit: {out.stderr.strip().splitlines()[-1:]}"
    if out.stdout.strip() != MERGEKIT_VERSION:
        return (
            f"{python} has mergekit {out.stdout.strip()}, the golden tests need {MERGEKIT_VERSION}"
        )
    return None


def mergekit_python_or_reason() -> tuple[Path | None, str]:
    """(python of a mergekit 0.1.5 environment, "") or (None, why the tests must skip)."""
    explicit = os.environ.get("EVOMERGE_MERGEKIT_PYTHON")
    if explicit:
        problem = _check_version(Path(explicit))
        return (None, problem) if problem else (Path(explicit), "")
    python = _python_in(ENV_DIR)
    if not python.exists():
        if os.environ.get("EVOMERGE_MERGEKIT") != "1":
            return None, (
                f"no mergekit environment: set EVOMERGE_MERGEKIT=1 to create {ENV_DIR} "
                "(or EVOMERGE_MERGEKIT_PYTHON to use an existing one)"
            )
        python = create_env()
    problem = _check_version(python)
    return (None, problem) if problem else (python, "")


def fill_in_paths(recipe_text: str, folders: dict) -> str:
    """A recipe with $name standing for model folders (`$base`, `$ft0`, ...) made concrete."""
    for name in sorted(folders, key=len, reverse=True):  # $ft10 before $ft1
        recipe_text = recipe_text.replace(f"${name}", str(folders[name]))
    return recipe_text


def run_driver(python: Path, jobs: dict, *, timeout: float = 900) -> dict:
    """Run mergekit_driver.py once with `jobs`; returns its results by job name."""
    with tempfile.TemporaryDirectory(prefix="mkdriver-") as tmp:
        jobs_path, results_path = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        jobs_path.write_text(json.dumps(jobs))
        env = {**os.environ, "OMP_NUM_THREADS": str(jobs.get("threads") or 1)}
        env.pop("PYTHONPATH", None)  # keep evomerge's environment out of mergekit's
        proc = subprocess.run(
            [str(python), str(DRIVER), str(jobs_path), str(results_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,  # judged below, with mergekit's stderr in the message
        )
        if proc.returncode != 0 or not results_path.exists():
            raise RuntimeError(
                f"mergekit driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        return json.loads(results_path.read_text())


if __name__ == "__main__":
    print(create_env())
    sys.exit(0)
