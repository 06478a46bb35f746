"""Faults: a killed merge, a full disk, a candidate that collapses to NaN, files that would run
code. Whatever happens, nothing half-done is left where the user looks, and nothing the user
did not ask for is executed."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers.tiny_models import build_tiny_pool

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def evomerge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge", *args],
        check=False,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def linear_recipe(tmp: Path, *models: Path) -> Path:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    return build_tiny_pool(tmp_path_factory.mktemp("tiny"), n_models=2)


# --- a killed merge -------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_merge_leaves_no_model_and_the_next_run_cleans_up(tmp_path):
    """Killed mid-write: the destination does not exist (only a hidden `.NAME.partial-*`
    folder does), and the next merge to the same destination removes that leftover."""
    torch.set_num_threads(1)
    big = build_tiny_pool(
        tmp_path / "big", n_models=1, hidden_size=512, intermediate_size=1024, num_hidden_layers=8
    )
    recipe = linear_recipe(tmp_path, big["base"], big["ft0"])
    out = tmp_path / "out" / "model"
    args = [sys.executable, "-m", "evomerge", "merge", str(recipe), str(out), "--shard-size", "1MB"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(out.parent.glob(".model.partial-*/shard-1.tmp")):  # the merge is mid-way
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the merge finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert not out.exists()
    leftovers = list(out.parent.glob(".model.partial-*"))
    assert len(leftovers) == 1 and str(proc.pid) in leftovers[0].name

    result = evomerge("merge", str(recipe), str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]
    assert (out / "model.safetensors").exists()


def test_stale_staging_of_a_live_process_is_kept(tmp_path):
    """Cleanup removes only the leftovers of dead processes: a merge still running to the same
    destination keeps its folder."""
    from evomerge.io.output import _owner, remove_stale_staging

    host = _owner().rsplit(".", 1)[0]
    live = tmp_path / f".model.partial-{_owner()}-abc123"
    dead = tmp_path / f".model.partial-{host}.{2**22 + 12345}-def456"
    other_host = tmp_path / ".model.partial-someotherhost.1-ghi789"
    # killed between the two renames of --force: the old model and the finished new one
    twins = [
        tmp_path / f".model.{kind}-{host}.{2**22 + 12346}-jkl012" for kind in ("old", "partial")
    ]
    for folder in (live, dead, other_host, *twins):
        folder.mkdir()
    assert remove_stale_staging(tmp_path / "model") == [dead]
    assert live.exists() and other_host.exists() and not dead.exists()
    assert all(t.exists() for t in twins)
    (tmp_path / "model").mkdir()  # once the destination exists again, the twins are stale
    assert sorted(remove_stale_staging(tmp_path / "model")) == sorted(twins)


# --- a full disk ------------------------------------------------------------------------------
def test_full_disk_injected_write_error(tmp_path, pool, monkeypatch, capsys):
    """The shard writer's write raising ENOSPC: one sentence, exit 2, nothing at the destination."""
    import evomerge.io.output
    from evomerge.cli import main

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(evomerge.io.output, "write_bytes", full_disk)
    out = tmp_path / "new" / "model"
    monkeypatch.setattr(
        sys,
        "argv",
        ["evomerge", "merge", str(linear_recipe(tmp_path, pool["ft0"], pool["ft1"])), str(out)],
    )
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    assert err.startswith("error: ") and "No space left on device" in err and str(out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # not even `new/`


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        check=False,
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_real(tmp_path, small_disk):
    """A real ENOSPC from a 1 MiB file system (the merged model is ~2 MB)."""
    torch.set_num_threads(1)
    models = build_tiny_pool(
        tmp_path / "models", n_models=1, hidden_size=128, intermediate_size=256
    )
    out = small_disk / "model"
    result = evomerge(
        "merge", str(linear_recipe(tmp_path, models["base"], models["ft0"])), str(out)
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1].rsplit("\r", 1)[-1]
    assert line.startswith("error: ") and "No space left on device" in line, result.stderr
    assert "Traceback" not in result.stderr
    assert list(small_disk.iterdir()) == []


# --- a candidate that collapses -----------------------------------------------------------------
@pytest.mark.slow
def test_nan_candidate_fails_its_trial_and_the_search_goes_on(tmp_path, small_pool):
    """Weights up to 1e40 overflow float32: those candidates are NaN/Inf, fail with a reason,
    and the search still runs every trial (the in-bounds baselines complete)."""
    import optuna

    config = {
        "pool": {
            "base": str(small_pool / "base"),
            "models": {n: str(small_pool / n) for n in ("add", "rev", "sort")},
        },
        "space": {
            "method": "linear",
            "search": {"weight": [0.0, 1.0e40]},
            "fixed": {"normalize": False},
        },
        "fitness": {
            "task_paths": [str(small_pool / "tasks")],
            "tasks": ["evomerge_add"],
            "subset": {"count": 4},
        },
        "search": {"sampler": "cmaes", "trials": 6, "seed": 0},
        "threads": 1,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    result = evomerge("search", str(path), "--run-dir", str(run_dir), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{run_dir / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all("NaN or Inf" in t.user_attrs["fail_reason"] for t in failed)
    assert any(t.state.name == "COMPLETE" for t in trials)


# --- code that must not run -------------------------------------------------------------------
def _with_remote_code(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of a model folder whose config and tokenizer config point at custom code that
    would create `marker` if it were ever imported."""
    shutil.copytree(src, dst)
    (dst / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nEvil = object\n"
    )
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"}
    (dst / "config.json").write_text(json.dumps(config))
    tok_file = dst / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text()) if tok_file.exists() else {}
    tok["auto_map"] = {"AutoTokenizer": ["evil.Evil", None]}
    tok_file.write_text(json.dumps(tok))
    return dst


def test_remote_code_is_never_run(tmp_path, small_pool):
    """The search's evaluation model and `evomerge eval` load with trust_remote_code=False."""
    from evomerge.fitness.live_model import load_live_model
    from evomerge.search.loop import load_eval_model

    marker = tmp_path / "remote-code-ran"
    model_dir = _with_remote_code(small_pool / "base", tmp_path / "model", marker)
    config = SimpleNamespace(
        pool=SimpleNamespace(
            base=str(model_dir), dtype="float32", vocabulary=dict, chat_template=None
        ),
        device="cpu",
    )
    for model, _ in (load_eval_model(config), load_live_model(model_dir)):
        assert type(model).__module__.startswith("transformers.")
    assert not marker.exists()


def _with_task_code(tasks: Path, dst: Path, marker: Path) -> Path:
    """A copy of a task folder with one more task, `evomerge_evil`, whose YAML imports a
    function (lm-eval's `!function`) that would create `marker` when its task is loaded."""
    shutil.copytree(tasks, dst)
    (dst / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\ndef docs(d):\n    return d\n"
    )
    add = next(dst.glob("*add*.yaml")).read_text().replace("evomerge_add", "evomerge_evil")
    (dst / "evil.yaml").write_text(add + "process_docs: !function evil.docs\n")
    return dst


def test_eval_loads_no_task_the_user_did_not_name(tmp_path, small_pool, monkeypatch, capsys):
    """Task folders are code: `eval` without task names refuses, naming what it could score,
    and with names it loads those tasks only; the unnamed task's code never runs."""
    from evomerge.cli import main

    marker = tmp_path / "task-code-ran"
    tasks = _with_task_code(small_pool / "tasks", tmp_path / "tasks", marker)
    model = str(small_pool / "add")
    for tail, code in (((), 2), (("--tasks", "evomerge_add", "--limit", "2"), 0)):
        monkeypatch.setattr(sys, "argv", ["evomerge", "eval", model, "--task-path", str(tasks)])
        sys.argv += tail
        try:
            main()
            exit_code = 0
        except SystemExit as exc:
            exit_code = exc.code
        err = capsys.readouterr().err
        assert exit_code == code, err
        if code:
            assert "no tasks named" in err and "evomerge_evil" in err and "run code" in err
    assert not marker.exists()


# --- a kill while a cache or a file is written --------------------------------------------------
def test_an_atomic_write_cut_short_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import evomerge.io.output
    from evomerge.io.output import write_text_atomic

    target = tmp_path / "heldout" / "scores-1-2.json"
    write_text_atomic(target, '{"old": 1}')

    def killed(self, text):
        raise KeyboardInterrupt  # the kill arrives mid-write

    monkeypatch.setattr(evomerge.io.output.tempfile, "NamedTemporaryFile", _FailingTemp(killed))
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, '{"new": 2}')
    assert target.read_text() == '{"old": 1}'
    assert [p.name for p in target.parent.iterdir()] == [target.name]


class _FailingTemp:
    """NamedTemporaryFile whose `write` runs `fail` instead (the file itself is real)."""

    def __init__(self, fail):
        import tempfile

        self.make, self.fail = tempfile.NamedTemporaryFile, fail

    def __call__(self, *args, **kwargs):
        handle = self.make(*args, **kwargs)
        handle.write = lambda text: self.fail(handle, text)
        return handle


@pytest.mark.parametrize("content", ['{"key": {"trials"', "", "[]", "\xff"], ids=repr)
def test_an_unreadable_held_out_cache_entry_is_treated_as_absent(tmp_path, content):
    """A cache written in place and cut short by a kill made every later `report` and
    `export` crash until the file was deleted; now it is scored again (here: the pool is gone,
    so the scores are reported unavailable, as without a cache)."""
    from test_report import make_run_folder

    from evomerge.results.heldout import best_baseline, chosen_scores
    from evomerge.search.run_folder import read_run_folder
    from evomerge.search.study import best_trial, open_run_study

    run = make_run_folder(tmp_path / "run")
    config = read_run_folder(run, check_pool=False)
    study = open_run_study(config, run)
    trial = best_trial(study)
    chosen = [t for t in (trial, best_baseline(study, other_than=trial.number)) if t]
    cache = run / "heldout" / f"scores-{'-'.join(str(t.number) for t in chosen)}.json"
    cache.parent.mkdir()
    cache.write_text(content, encoding="latin-1")
    assert "unavailable" in chosen_scores(config, run, study, trial)


# --- a full disk during a search ----------------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        RuntimeError("(sqlite3.OperationalError) database or disk is full"),
    ],
    ids=["write", "storage"],
)
def test_a_full_disk_during_a_search_is_one_sentence_and_fails_the_trial(
    tmp_path, small_pool, monkeypatch, capsys, error
):
    """Once six chained tracebacks and a trial left RUNNING."""
    import optuna

    import evomerge.search.loop
    from evomerge.cli import main

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(evomerge.search.loop, "write_examples", full)
    config = {
        "pool": {
            "base": str(small_pool / "base"),
            "models": {n: str(small_pool / n) for n in ("add", "rev")},
        },
        "space": "linear_global",
        "fitness": {
            "task_paths": [str(small_pool / "tasks")],
            "tasks": ["evomerge_add"],
            "subset": {"count": 4},
        },
        "search": {"sampler": "random", "trials": 3, "seed": 0, "baselines": False},
        "threads": 1,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    monkeypatch.setattr(
        sys,
        "argv",
        ["evomerge", "search", str(tmp_path / "config.yaml"), "--run-dir", str(run_dir)],
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.strip().splitlines() if line.strip()]
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: the disk is full") and "evomerge resume" in lines[-1]
    assert sum(line.startswith(("error", "WARNING", "ERROR")) for line in lines) == 1, err
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{run_dir / 'study.db'}")
    (trial,) = study.get_trials(deepcopy=False)  # the search stopped at the first
    assert trial.state.name == "FAIL" and "disk is full" in lines[-1]
    assert trial.user_attrs["fail_reason"].startswith(type(error).__name__)
    assert any(w in trial.user_attrs["fail_reason"] for w in ("No space", "disk is full"))


def test_an_atomic_write_follows_the_umask_like_a_plain_write(tmp_path):
    from evomerge.io.output import write_text_atomic

    (tmp_path / "plain.json").write_text("{}")
    write_text_atomic(tmp_path / "atomic.json", "{}")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["atomic.json"] == modes["plain.json"]
