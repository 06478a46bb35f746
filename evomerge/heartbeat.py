"""Heartbeats, so a dead worker's trial does not stay RUNNING forever.

Optuna 5 has heartbeats only for `RDBStorage`, and there a trial whose worker dies between
creating it and recording its first beat has no heartbeat row and is never found stale (seen as
a rare orphan RUNNING trial after SIGKILL); `JournalStorage` has none at all
(optuna/optuna#6615 is not in 5.0). So every storage gets this, built on Optuna's public API:

- while a trial runs, a thread stamps it with the user attribute `heartbeat` (seconds since the
  epoch) every `interval` seconds;
- after each trial (and when a worker starts), a worker fails every RUNNING trial whose last
  stamp, or start if it has none yet, is more than `grace` seconds old and still the same at a
  check at least an interval later, and queues each one once more (`max_retry`) with Optuna's
  `RetryHeartbeatStaleTrialCallback`;
- a worker whose budget is met leaves only once every RUNNING trial has stamped since then
  (`silent_since`): a dead worker's trial is failed after the grace period, and its retry
  run, before the last worker leaves.

The stamps are wall-clock times of the workers, so workers on several nodes need synchronised
clocks (NTP); the grace period should exceed the longest pause of a live worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

LOG = logging.getLogger(__name__)

HEARTBEAT_ATTR = "heartbeat"


class TrialHeartbeat:
    """Beat for the running trial; fail and retry the trials of workers that stopped beating."""

    def __init__(self, *, interval: int, grace: int, max_retry: int = 1):
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        if grace <= interval:
            raise ValueError(
                f"grace ({grace} s) must be longer than the heartbeat interval ({interval} s)"
            )
        self.interval, self.grace = interval, grace
        self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self._suspects: dict[int, tuple[float, float]] = {}  # trial -> (its last stamp, first seen stale)

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

    def fail_stale_at_start(self, study: optuna.Study) -> list[int]:
        """fail_stale, checked twice an interval apart (a worker starting finds a dead one's
        trial without waiting for a trial of its own)."""
        failed = self.fail_stale(study)
        if self._suspects:
            time.sleep(self.interval)
            failed += self.fail_stale(study)
        return failed

    def silent_since(self, study: optuna.Study, since: float) -> list[int]:
        """The RUNNING trials with no stamp since `since`. A live worker stamps its trial within
        an interval; a dead worker's trial is failed by `fail_stale` after the grace period."""
        from optuna.trial import TrialState

        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t.number for t in running if _last_sign_of_life(t) < since]

    def fail_stale(self, study: optuna.Study, *_: object) -> list[int]:
        """Fail (and queue once more) the RUNNING trials that stopped beating; their numbers.

        The signature also fits `study.optimize(callbacks=...)`, which calls it after each trial.
        """
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now, failed, suspects = time.time(), [], {}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
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


def _last_sign_of_life(trial: optuna.trial.FrozenTrial) -> float:
    """The trial's last heartbeat stamp, or its start if it has none yet."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(trial.user_attrs.get(HEARTBEAT_ATTR, 0.0), started)
