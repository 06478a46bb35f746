"""Search throughput with 1, 2, 3 ... local `evomerge worker` processes on one study.

    python bench/workers.py [--config configs/demo.yaml] [--trials 40] [--workers 1 2 3]
                            [--storage sqlite|journal]

For each worker count, in this one run: a fresh run folder and study (`evomerge search --trials 0`,
baselines queued), then that many `evomerge worker` processes, each with 1 thread, until the study
holds `--trials` finished trials. Every count runs the same budget, so the mix of subset-only and
full evaluations is alike. Prints trials per minute and the ratio to 1 worker, twice:

  running  trials / (last trial's end - first trial's start), read from the study: the search
           itself, without each worker's start-up (imports, loading the pool, building tasks)
  wall     trials / time from starting the workers until the last one exits
  cpu      CPU seconds of all workers per trial, each worker's start-up taken out (measured
           once: a worker joining a finished study loads everything and leaves): unlike the
           rates it hardly depends on other load on the machine; flat means the workers do not
           get in each other's way (the storage is no bottleneck), so the rate scales with cores

The demo pool is built with `evomerge pool demo runs/demo-pool` if missing (~2 min). Trials on
one machine share its cores: with C cores, more than C one-thread workers cannot go faster.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def evomerge(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge", *args]


def study_trials(run_dir: Path):
    import optuna

    from evomerge.search.study import open_storage

    meta = yaml.safe_load((run_dir / "config.yaml").read_text())["search"]
    url = meta["storage"] or f"sqlite:///{run_dir / 'study.db'}"
    return optuna.load_study(study_name=meta["study_name"], storage=open_storage(url)).get_trials()


def run_workers(config: Path, run_dir: Path, workers: int) -> dict:
    subprocess.run(
        evomerge("search", str(config), "--run-dir", str(run_dir), "--trials", "0"),
        env=ENV,
        check=True,
        capture_output=True,
    )
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    logs = [(run_dir / f"worker-{i}.log").open("w") for i in range(workers)]
    procs = [
        subprocess.Popen(
            evomerge("worker", str(run_dir)), env=ENV, stdout=log, stderr=subprocess.STDOUT
        )
        for log in logs
    ]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    for log in logs:
        log.close()
    if any(codes):
        sys.exit(f"a worker failed ({codes}); see {run_dir}/worker-*.log")
    trials = [t for t in study_trials(run_dir) if t.state.is_finished()]
    span = (
        max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    ).total_seconds()
    return {
        "trials": len(trials),
        "running": len(trials) / span * 60,
        "wall": len(trials) / wall * 60,
        "cpu_total": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument(
        "--trials", type=int, default=40, help="study budget for every worker count"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--storage", choices=["sqlite", "journal"], default="sqlite")
    args = parser.parse_args()

    from evomerge.search.config import load_run_config

    pool = ROOT / "runs" / "demo-pool"
    if args.config == ROOT / "configs" / "demo.yaml" and not (pool / "pool.json").exists():
        print(f"building the demo pool in {pool} (~2 min) ...", flush=True)
        subprocess.run(evomerge("pool", "demo", str(pool)), env=ENV, check=True)

    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-bench-workers-"))
    base = load_run_config(args.config).model_dump(mode="json")  # paths resolved
    rows = {}
    for n in args.workers:
        config = {**base, "threads": 1, "search": {**base["search"], "trials": args.trials}}
        if args.storage == "journal":
            config["search"]["storage"] = str(tmp / f"study-{n}.log")
        path = tmp / f"config-{n}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"{n} worker(s) ...", flush=True)
        rows[n] = run_workers(path, tmp / f"run-{n}", n)

    # start-up CPU of one worker: join the last (finished) study, which loads all and exits
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        evomerge("worker", str(tmp / f"run-{n}")), env=ENV, check=True, capture_output=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    startup = sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
    for n, r in rows.items():
        r["cpu"] = (r["cpu_total"] - n * startup) / r["trials"]

    ref = rows.get(1) or next(iter(rows.values()))
    print(
        f"\n{args.config.name}, {args.trials} trials, {args.storage} storage, 1 thread per worker, "
        f"{os.cpu_count()} cores, load average before: {load_before:.1f}; "
        f"start-up {startup:.1f} CPU s per worker"
    )
    print(
        f"{'workers':>7}  {'trials':>6}  {'running/min':>11}  {'ratio':>5}  {'wall/min':>8}  "
        f"{'ratio':>5}  {'cpu s/trial':>11}"
    )
    for n, r in rows.items():
        print(
            f"{n:>7}  {r['trials']:>6}  "
            f"{r['running']:>11.1f}  {r['running'] / ref['running']:>5.2f}  "
            f"{r['wall']:>8.1f}  {r['wall'] / ref['wall']:>5.2f}  {r['cpu']:>11.2f}"
        )
    print(f"(run folders in {tmp})")


if __name__ == "__main__":
    sys.exit(main())
