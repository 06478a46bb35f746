"""Many workers on one study (issue #6), on a real PostgreSQL server and on a journal file.

Three `evomerge worker` processes share one study on the small demo pool; one is SIGKILLed in
the middle of a trial. The study must still reach its budget with every result kept, no trial
number twice, the dead worker's trial FAIL and retried (not RUNNING forever), CMA-ES generations
shared across the workers, and `export`, `report` and `resume` must work on the result.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.postgres import postgres_url  # noqa: F401  (fixture)
from test_search import ENV, evomerge, write_config

pytestmark = pytest.mark.slow

TRIALS = 45  # room for a slow start: the victim must be caught with >= 12 trials to go
POPSIZE = 7  # CMA-ES population for the 3 genes of linear_global: 4 + floor(3 ln 3)


def open_study(url: str, name: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(url)) if url.endswith(".log") else url
    return optuna.load_study(study_name=name, storage=storage)


def trials_by(study, worker: str, state: str):
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("worker") == worker and t.state.name == state
    ]


def kill_mid_trial(proc: subprocess.Popen, study, worker: str, deadline: float) -> int:
    """SIGKILL `proc` while it is scoring a candidate; return that trial's number.

    A trial of the demo pool takes well under a second, so the worker is frozen first (SIGSTOP)
    and killed only if it is then scoring a merged candidate (a trial killed before its genome is
    drawn is retried with a fresh one); otherwise it is let go and tried again.
    """
    while time.time() < deadline:
        assert proc.poll() is None, "the worker to kill exited first (the budget was met too soon)"
        proc.send_signal(signal.SIGSTOP)
        running = [
            t for t in trials_by(study, worker, "RUNNING") if "merge_seconds" in t.user_attrs
        ]
        if running:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return running[0].number
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("never caught the worker inside a trial")


@pytest.fixture(params=["postgresql", "journal"])
def storage_url(request, tmp_path) -> str:
    if request.param == "journal":
        return str(tmp_path / "study.log")
    return request.getfixturevalue("postgres_url")


def test_three_workers_one_killed(tmp_path, small_pool, storage_url):
    study_name = f"workers-{tmp_path.name}"
    config = write_config(
        tmp_path,
        small_pool,
        trials=TRIALS,
        storage=storage_url,
        study_name=study_name,
        heartbeat_seconds=1,
        grace_seconds=3,
        fidelity=None,  # every trial scores all of dev, in small batches: a trial lasts long
        batch_size=2,  # enough to be caught mid-trial on a fast machine
    )
    run_dir = tmp_path / "run"
    evomerge(
        "search", str(config), "--run-dir", str(run_dir), "--trials", "0"
    )  # study + baselines only
    study = open_study(storage_url, study_name)
    assert len(study.trials) == 4 and all(t.state.name == "WAITING" for t in study.trials)

    logs = [(tmp_path / f"worker-{i}.log").open("w") for i in range(3)]
    cmd = [sys.executable, "-m", "evomerge", "worker", str(run_dir)]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    names = [f"{socket.gethostname()}:{p.pid}" for p in procs]
    victim, survivors = procs[0], procs[1:]
    try:
        deadline = time.time() + 180
        while not trials_by(study, names[0], "COMPLETE"):  # the victim has done real work
            assert time.time() < deadline and victim.poll() is None, (
                "the first worker finished no trial"
            )
            time.sleep(0.2)
        before = {
            t.number: t.value
            for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE"
        }
        killed = kill_mid_trial(victim, study, names[0], deadline)
        # the survivors must still be running trials after the grace period to fail it
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        assert len(finished) <= TRIALS - 12, (
            f"the victim worker got going too late ({len(finished)} trials finished, "
            f"{time.time() - deadline + 180:.0f} s after the workers started)"
        )
        for proc in survivors:
            proc.wait(timeout=180)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()
    for proc, log in zip(survivors, logs[1:]):
        assert proc.returncode == 0, Path(log.name).read_text()[-3000:]

    trials = open_study(storage_url, study_name).get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    states = {t.number: t.state.name for t in trials}
    assert [t.number for t in trials] == list(range(len(trials)))  # no number twice, none skipped
    assert "RUNNING" not in states.values() and "WAITING" not in states.values(), states
    assert sum(s in ("COMPLETE", "FAIL") for s in states.values()) >= TRIALS

    # the killed worker's trial failed, and ran once more, with the same genome, on a live worker
    assert states[killed] == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == by_number[killed].params
    assert retries[0].user_attrs["worker"] in names[1:]
    assert list(states.values()).count("FAIL") == 1

    # nothing finished was lost, and every result is whole
    assert {n: by_number[n].value for n in before} == before
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert all(
        t.value == t.user_attrs["fitness"] and t.user_attrs["worker"] in names for t in complete
    )
    assert {t.user_attrs["worker"] for t in complete} == set(names)  # all three did work
    # workers propose different genomes (they do not replay each other's seeded draws)
    genomes = [
        tuple(sorted(t.params.items())) for t in trials if "failed_trial" not in t.system_attrs
    ]
    assert len(set(genomes)) == len(genomes)

    # one CMA-ES shared through the storage: no trial of a generation is scored before POPSIZE
    # trials of the previous one are complete, whichever workers ran them (a trial draws its
    # genome between its start and its end)
    generation = {t.number: t.system_attrs.get("cma:generation") for t in complete}
    assert max(g for g in generation.values() if g is not None) >= 1
    for g in sorted({g for g in generation.values() if g}):
        first = min(t.datetime_complete for t in complete if generation[t.number] == g)
        done = [
            t for t in complete if generation[t.number] == g - 1 and t.datetime_complete < first
        ]
        assert len(done) >= POPSIZE, (g, len(done))
    assert len({t.user_attrs["worker"] for t in complete if generation[t.number] == 0}) >= 2

    # the run folder works as any other: export, report (and resume, below)
    evomerge("export", str(run_dir), str(tmp_path / "best"))
    assert (tmp_path / "best" / "model.safetensors").exists()
    report = evomerge("report", str(run_dir)).stdout
    assert "best" in report.lower()
    if not storage_url.endswith(".log"):
        return  # resume opens either storage the same way; once keeps the test set short
    evomerge("resume", str(run_dir), "--trials", "1")
    after = open_study(storage_url, study_name).get_trials(deepcopy=False)
    assert [t.number for t in after] == list(range(len(trials) + 1))
    assert after[-1].state.name == "COMPLETE"
