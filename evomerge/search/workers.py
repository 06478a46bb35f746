"""Many workers on one study: heartbeats, stale trials and their retries, the budget wait.

Any number of processes (`evomerge worker`, one per GPU or node) run trials of one study in
shared Optuna storage; Optuna hands each a different trial and keeps the sampler state in the
storage. What Optuna leaves open is a worker that dies mid-trial: its trial would stay RUNNING
forever. Optuna 5 has heartbeats only for `RDBStorage`, and there a trial whose worker dies
between creating it and recording its first beat has no heartbeat row and is never found stale
(seen as a rare orphan RUNNING trial after SIGKILL); `JournalStorage` has none at all
(optuna/optuna#6615 is not in 5.0). So every storage gets this, built on Optuna's public API:

- while a trial runs, a thread stamps it with the user attribute `heartbeat` (seconds since the
  epoch) every `interval` seconds;
- after each trial (and when a worker starts), a worker fails every RUNNING trial whose last
  stamp, or start if it has none yet, is more than `grace` seconds old and still the same at a
  check at least an interval later, and queues each one once more (`max_retry`) with Optuna's
  `RetryHeartbeatStaleTrialCallback`;
- a worker whose budget is met leaves only once every RUNNING trial has stamped since then
  (`wait_for_silent_trials`): a dead worker's trial is failed after the grace period, and its
  retry run, before the last worker leaves.

The checks after a trial read the scan of the study the search makes once per trial; only the
waits scan on their own. The stamps are wall-clock times of the workers, so workers on several
nodes need synchronised clocks (NTP); the grace period should exceed the longest pause of a
live worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

LOG = logging.getLogger(__name__)

HEARTBEAT_ATTR = "heartbeat"


def worker_name() -> str:
    """How trials name the worker that ran them: host and process."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def retry_waiting(trials: Sequence) -> bool:
    """Whether a failed trial's retry waits to be run (queued baselines do not count: a
    `--trials 0` search queues them and stops)."""
    from optuna.trial import TrialState

    return any(t.state == TrialState.WAITING and "failed_trial" in t.system_attrs for t in trials)


class Coordinator:
    """Beat for this worker's trial; fail and retry the trials of workers that stopped
    beating; keep a worker whose budget is met until its peers' trials are done."""

    def __init__(self, *, interval: int, grace: int, max_retry: int = 1):
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        if grace <= interval:
            raise ValueError(
                f"grace ({grace} s) must be longer than the heartbeat interval ({interval} s)"
            )
        self.interval, self.grace = interval, grace
        self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self._suspects: dict[
            int, tuple[float, float]
        ] = {}  # trial -> (its last stamp, first seen stale)

    @contextmanager
    def beating(self, trial: optuna.Trial) -> Iterator[None]:
        """Stamp `trial` every `interval` seconds while the body runs."""
        from optuna.exceptions import UpdateFinishedTrialError

        stop = threading.Event()

        def beat() -> None:
            while True:
                try:
                    trial.set_user_attr(HEARTBEAT_ATTR, time.time())
                except UpdateFinishedTrialError:  # another worker judged this one dead
                    LOG.warning(
                        "trial %d was failed by another worker (no heartbeat for %d s)",
                        trial.number,
                        self.grace,
                    )
                    return
                except Exception as exc:  # a busy or briefly unreachable storage: beat again later
                    LOG.warning("trial %d: heartbeat not recorded (%s)", trial.number, exc)
                if stop.wait(self.interval):
                    return

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def fail_stale_at_start(self, study: optuna.Study) -> None:
        """fail_stale, checked twice an interval apart (a worker starting finds a dead one's
        trial without waiting for a trial of its own)."""
        self.fail_stale(study, study.get_trials(deepcopy=False))
        if self._suspects:
            time.sleep(self.interval)
            self.fail_stale(study, study.get_trials(deepcopy=False))

    def fail_stale(self, study: optuna.Study, trials: Sequence) -> list[int]:
        """Fail (and queue once more) the RUNNING trials of `trials` (a scan of `study`) that
        stopped beating; their numbers."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now, failed, suspects = time.time(), [], {}
        for trial in trials:
            if trial.state != TrialState.RUNNING:
                continue
            last = _last_sign_of_life(trial)
            if now - last <= self.grace:
                continue
            # Stale now, but failed only if still without a new stamp at a later check, at least
            # a heartbeat interval on: when the storage itself stalled every worker (a journal
            # file's lock held by a killed worker), the live ones beat again as soon as it frees.
            seen = self._suspects.get(trial.number)
            suspects[trial.number] = seen if seen and seen[0] == last else (last, now)
            if not seen or seen[0] != last or now - seen[1] < self.interval:
                continue
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, UpdateFinishedTrialError):  # another worker failed it first
                continue
            LOG.warning(
                "trial %d: no heartbeat for %.0f s; marked failed", trial.number, now - last
            )
            self._retry(study, trial)
            failed.append(trial.number)
            suspects.pop(trial.number)
        self._suspects = suspects
        return failed

    def wait_for_silent_trials(self, study: optuna.Study, deadline: float | None) -> bool:
        """With the budget met, wait while another worker's RUNNING trial has not beaten since:
        it beats, ends, or goes stale. True when a stale one was failed and its retry queued."""
        met, told = time.time(), False
        trials = study.get_trials(deepcopy=False)
        while silent := _silent_since(trials, met):
            if deadline and time.monotonic() >= deadline:
                return False
            if not told and time.time() - met > 2 * self.interval:
                told = True  # a live worker would have beaten by now
                LOG.warning(
                    "the budget is met; waiting for trial(s) %s of another worker, "
                    "silent for %.0f s or more "
                    "(a dead worker's trial is failed after search.grace_seconds and run here)",
                    silent,
                    time.time() - met,
                )
            time.sleep(self.interval)
            trials = study.get_trials(deepcopy=False)
            if self.fail_stale(study, trials):
                return True
        return False


def _silent_since(trials: Sequence, since: float) -> list[int]:
    """The RUNNING trials with no stamp since `since`. A live worker stamps its trial within
    an interval; a dead worker's trial is failed by `fail_stale` after the grace period."""
    from optuna.trial import TrialState

    return [
        t.number for t in trials if t.state == TrialState.RUNNING and _last_sign_of_life(t) < since
    ]


def _last_sign_of_life(trial: optuna.trial.FrozenTrial) -> float:
    """The trial's last heartbeat stamp, or its start if it has none yet."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(trial.user_attrs.get(HEARTBEAT_ATTR, 0.0), started)
