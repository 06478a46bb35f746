"""Run inside the mergekit 0.1.5 environment (NOT evomerge's): many merges in one process.

mergekit-yaml costs ~10 s of start-up per call, so the golden tests and the benchmark hand all
their recipes to this script at once. It uses mergekit's public Python API only.

    python mergekit_driver.py JOBS.json RESULTS.json

JOBS.json: {"threads": 1,
            "merges": [{"name", "recipe" (YAML text), "out" (folder), "seed" (int or null)}],
            "multi":  [{... as merges, "recipe" of named documents, "intermediate_dir"}],
            "parse":  [{"name", "recipe" (YAML text)}]}
RESULTS.json: {name: {"ok": bool, "error": str, "seconds": float, "config": dict}}
A failing job is recorded, not raised, so one refusal does not hide the other results.
"""

import json
import re
import sys
import time
import traceback


def main(jobs_path: str, results_path: str) -> None:
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with open(jobs_path) as f:
        jobs = json.load(f)
    threads = jobs.get("threads")
    if threads:  # set once here: MergeOptions(num_threads=) would reset interop threads per job
        torch.set_num_threads(int(threads))
    results = {}
    for job in jobs.get("parse", []):
        try:
            config = MergeConfiguration.model_validate(yaml.safe_load(job["recipe"]))
            dumped = config.model_dump(mode="json", exclude_none=True)
            results[job["name"]] = {"ok": True, "config": dumped}
        except Exception as exc:  # noqa: BLE001 (any refusal is recorded for the test to judge)
            results[job["name"]] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def options(job):
        return MergeOptions(
            copy_tokenizer=False,
            write_model_card=False,
            quiet=True,
            random_seed=job.get("seed"),
            out_shard_size=job.get("shard_bytes", 5_000_000_000),
            lora_merge_cache=job.get("lora_cache"),  # where `base+adapter` models are merged
        )

    def merge(job):
        config = MergeConfiguration.model_validate(yaml.safe_load(job["recipe"]))
        run_merge(config, job["out"], options(job))

    def multi_merge(job):  # what mergekit-multi's main() does, without its CLI parsing
        from mergekit.graph import Executor
        from mergekit.scripts.multimerge import load_config, make_tasks

        stages = job["intermediate_dir"]
        configs, dependencies = load_config(job["recipe"], stages)
        tasks = make_tasks(configs, dependencies, options(job), stages, job["out"], lazy=False)
        Executor(tasks, math_device="cpu", storage_device="cpu").execute(desc="stages")

    for kind, run in (("merges", merge), ("multi", multi_merge)):
        for job in jobs.get(kind, []):
            started = time.perf_counter()
            try:
                run(job)
                # The process's peak resident memory so far (VmHWM starts anew at exec,
                # ru_maxrss does not).
                peak_kib = int(
                    re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)
                )
                results[job["name"]] = {
                    "ok": True,
                    "seconds": time.perf_counter() - started,
                    "peak_kib": peak_kib,
                }
            except Exception as exc:  # noqa: BLE001 (recorded, so one failure hides no other)
                results[job["name"]] = {
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
