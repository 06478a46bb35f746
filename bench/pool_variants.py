"""How mergeable a variant of an offline pool is: what merges of its specialists keep.

    python bench/pool_variants.py [--pool demo] [--set spec_lr=1e-3 replay=0.5 ...] [--out FILE]

A variant is the pool's full schedule (`evomerge.pool.training.pool_size(pool, "full")`) with
`--set` overrides of `PoolSize` fields (base_steps, spec_steps, spec_lr, replay, hidden, ...;
an int field takes only whole numbers). It is trained in memory as `evomerge pool` trains the
pool (`train_base`, then `train_specialist` per skill, with the same seeds), written as HF
folders beside the pool's dev and test tasks in a temporary folder, and scored by the real
evaluator (`evomerge.fitness.Evaluator`, one live model per run, full dev and test splits).

The merges are the search's in-memory candidates (`CompiledCandidate` over a global
`SearchSpace`; bit for bit `evomerge merge` of the decoded recipe, tests/test_candidate.py):
task arithmetic with weights 1/n and with weights 1, the best on dev of a task-arithmetic grid
(each model's weight in 0.25..1.25, 5^n merges) and of a TIES grid (density 0.3/0.5/0.7/1 x
weights {0.5, 1}^n). Printed: dev and test per task and mean of every model and merge; the
best specialist on dev; the test margin (points x100) of the two grid winners over it and
their per-skill retention (test score on a skill / that skill's specialist's); the task
vectors' (specialist - base) mean pairwise cosine and norms; seconds. `--out` writes it all as
JSON. One torch thread; the demo pool takes about 2 minutes (80 s of it training).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.errors import UserError
from evomerge.pool.training import PoolSize

SPLITS = ("dev", "test")
TA_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.25)
TIES_DENSITIES = (0.3, 0.5, 0.7, 1.0)
TIES_WEIGHTS = (0.5, 1.0)


def apply_overrides(spec: PoolSize, pairs: list[str]) -> tuple[PoolSize, dict[str, float]]:
    """`spec` with `key=value` pairs applied (ints stay ints), and the changes; UserError for
    an unknown field or a value of the wrong kind."""
    fields = [f.name for f in dataclasses.fields(spec)]
    changes: dict[str, float] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in fields:
            raise UserError(
                f"--set {pair!r}: not a field of PoolSize; give key=value with key one of "
                f"{', '.join(fields)}"
            )
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"--set {pair!r}: {text!r} is not a number") from None
        if isinstance(getattr(spec, key), int):
            if not value.is_integer():
                raise UserError(f"--set {pair!r}: {key} takes a whole number")
            value = int(value)
        changes[key] = value
    return dataclasses.replace(spec, **changes), changes


# --- the variant: trained in memory, written as a pool's folders --------------------------
def train_variant(
    skills: dict, spec: PoolSize, tokenizer
) -> tuple[dict[str, dict], dict[str, float]]:
    """State dicts of the base and of each specialist, trained as `build_pool` trains them; and
    the seconds of the base and of all specialists."""
    from evomerge.pool import train_base, train_specialist

    started = time.perf_counter()
    model, _ = train_base(skills, tokenizer, spec)
    states = {"base": clone(model.state_dict())}
    seconds = {"base": time.perf_counter() - started}
    for skill in skills:
        train_specialist(model, states["base"], skills, skill, tokenizer, spec)
        states[skill] = clone(model.state_dict())
    seconds["specialists"] = time.perf_counter() - started - seconds["base"]
    return states, seconds


def clone(state: dict) -> dict:
    return {name: tensor.clone() for name, tensor in state.items()}


def write_folders(root: Path, spec: PoolSize, states: dict[str, dict], tokenizer) -> dict[str, str]:
    """Each model of the variant as an HF folder under `root`: name -> folder."""
    from evomerge.pool.training import make_model

    model = make_model(spec, tokenizer, seed=0)
    folders = {}
    for name, state in states.items():
        model.load_state_dict(state)
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
        folders[name] = str(root / name)
    return folders


# --- scoring -------------------------------------------------------------------------------
class Scorer:
    """The live model (the base's folder, overwritten by each model or merge) and one real
    evaluator per split over the variant's tasks, as `evomerge search` and its report score."""

    def __init__(self, root: Path, pool: str, skills: dict, base_folder: str):
        import torch

        from evomerge.fitness import Evaluator, FitnessConfig
        from evomerge.fitness.live_model import load_live_model
        from evomerge.pool.tasks import write_tasks

        task_names = write_tasks(root / "tasks", pool, skills)
        self.tasks = dict(zip(task_names, skills))  # task -> skill
        config = FitnessConfig(
            tasks=[{"name": t, "metric": s.metric} for t, s in zip(task_names, skills.values())],
            task_paths=[str(root / "tasks")],
        )
        self.live, tokenizer = load_live_model(base_folder, dtype=torch.float32)
        self.evaluators = {
            split: Evaluator(self.live, tokenizer, config, root / f"eval-{split}", split=split)
            for split in SPLITS
        }

    def load(self, state: dict) -> None:
        self.live.load_state_dict(state)  # in place: the candidates' targets stay the live tensors

    def score(self, splits=SPLITS) -> dict[str, dict[str, float]]:
        """split -> skill -> the task's metric, plus `mean`, of the live model as it is now."""
        out = {}
        for split in splits:
            per_task = self.evaluators[split].score(full=True).per_task
            row = {self.tasks[task]: value for task, value in per_task.items()}
            out[split] = row | {"mean": sum(row.values()) / len(row)}
        return out


# --- merges: the search's compiled candidates over global spaces ---------------------------
def candidate(scorer: Scorer, folders: dict[str, str], skills: dict, method: str, search: dict):
    """(space, compiled candidate) of a one-group `method` space over the specialists."""
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.spaces.parameters.candidate import CompiledCandidate
    from evomerge.spaces.parameters.space import SearchSpace, load_space

    space = SearchSpace(
        load_space({"method": method, "search": search}),
        base=folders["base"],
        models={s: folders[s] for s in skills},
        num_layers=Checkpoint(folders["base"]).num_layers,
        dtype="float32",
    )
    return space, CompiledCandidate(scorer.live, space, seed=0)


def genome(space, weights: dict[str, float], density: float = 1.0) -> dict[str, float]:
    found = space.genome_of({"weight": lambda model: weights[model], "density": density})
    assert found is not None, (weights, density)  # every grid value lies within the bounds
    return found


def best_on_dev(scorer: Scorer, merge, grid: dict) -> tuple:
    """The label of `grid` (label -> genome) whose merge scores best on dev mean (the first of
    ties), and its dev and test scores."""
    best, best_dev = None, None
    for label, point in grid.items():
        merge.apply(point)
        dev = scorer.score(("dev",))["dev"]
        if best_dev is None or dev["mean"] > best_dev["mean"]:
            best, best_dev = label, dev
    merge.apply(grid[best])
    return best, scorer.score()


def score_merges(scorer: Scorer, folders: dict[str, str], skills: dict) -> tuple[dict, dict]:
    """Rows of the fixed merges and grid winners, and the winners' grid points."""
    names, n = list(skills), len(skills)
    ta_bounds = {"weight": [0.0, max(TA_WEIGHTS)]}
    ta_space, ta = candidate(scorer, folders, skills, "task_arithmetic", ta_bounds)
    rows, picks = {}, {}
    for label, weight in ((f"TA 1/{n}", 1 / n), ("TA 1", 1.0)):
        ta.apply(genome(ta_space, dict.fromkeys(names, weight)))
        rows[label] = scorer.score()
    ta_grid = {
        w: genome(ta_space, dict(zip(names, w))) for w in itertools.product(TA_WEIGHTS, repeat=n)
    }
    picks["TA grid"], rows["TA grid"] = best_on_dev(scorer, ta, ta_grid)
    ties_space, ties = candidate(scorer, folders, skills, "ties", {"weight": None, "density": None})
    ties_grid = {
        (d, w): genome(ties_space, dict(zip(names, w)), d)
        for d in TIES_DENSITIES
        for w in itertools.product(TIES_WEIGHTS, repeat=n)
    }
    picks["TIES grid"], rows["TIES grid"] = best_on_dev(scorer, ties, ties_grid)
    return rows, picks


# --- what the merges keep ------------------------------------------------------------------
def task_vector_stats(states: dict[str, dict], skills: dict) -> dict:
    """Pairwise cosines (and their mean) and L2 norms of the specialists' task vectors."""
    import torch

    base = states["base"]
    flat = {
        s: torch.cat([(states[s][k] - base[k]).flatten().double() for k in base]) for s in skills
    }
    cos = {
        f"{a}-{b}": torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0).item()
        for a, b in itertools.combinations(skills, 2)
    }
    norm = {s: v.norm().item() for s, v in flat.items()}
    return {"cos": cos, "mean_cos": sum(cos.values()) / len(cos), "norm": norm}


def summary(rows: dict, skills: dict) -> dict:
    """The best specialist on dev, and each grid winner's test margin over it and retention."""
    best = max(skills, key=lambda s: rows[s]["dev"]["mean"])
    out = {"best_specialist": best}
    for merge in ("TA grid", "TIES grid"):
        test = rows[merge]["test"]
        out[merge] = {
            "margin_x100": 100 * (test["mean"] - rows[best]["test"]["mean"]),
            "retention": {s: ratio(test[s], rows[s]["test"][s]) for s in skills},
        }
    return out


def ratio(kept: float, specialist: float) -> float:
    return kept / specialist if specialist else float("nan")


# --- output --------------------------------------------------------------------------------
def fmt(values: dict[str, float], digits: int = 3) -> str:
    return " ".join(f"{k} {v:.{digits}f}" for k, v in values.items())


def print_block(result: dict) -> None:
    skills, rows, summ = result["skills"], result["rows"], result["summary"]
    sec, tv = result["seconds"], result["task_vectors"]
    overrides = " ".join(f"{k}={v:g}" for k, v in result["overrides"].items()) or "none"
    print(
        f"VARIANT {result['pool']} full, overrides: {overrides}; train base {sec['base']:.0f} s + "
        f"specialists {sec['specialists']:.0f} s, merges and scoring {sec['scoring']:.0f} s"
    )
    names = " ".join(f"{s:>5s}" for s in skills)
    print(f"  {'':10s} dev: {names}  mean | test: {names}  mean")
    for label, row in rows.items():
        cells = [" ".join(f"{row[split][k]:5.3f}" for k in (*skills, "mean")) for split in SPLITS]
        print(f"  {label:10s}      {cells[0]} |       {cells[1]}")
    ta, (density, weights) = result["picks"]["TA grid"], result["picks"]["TIES grid"]
    print(
        f"  TA grid best weights {tuple(ta)}; TIES grid best density {density} weights "
        f"{tuple(weights)}"
    )
    best = summ["best_specialist"]
    print(f"  best specialist on dev: {best} (test {rows[best]['test']['mean']:.3f})")
    for merge in ("TA grid", "TIES grid"):
        print(
            f"  {merge}: test margin {summ[merge]['margin_x100']:+.1f}, "
            f"retention {fmt(summ[merge]['retention'], 2)}"
        )
    print(
        f"  task vectors: mean cos {tv['mean_cos']:.3f} ({fmt(tv['cos'])}); norm "
        f"{fmt(tv['norm'], 2)}"
    )


def main() -> None:
    from evomerge.pool import POOLS
    from evomerge.pool.training import pool_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="demo", choices=sorted(POOLS))
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="PoolSize fields to change"
    )
    parser.add_argument("--out", type=Path, help="write everything as JSON here")
    args = parser.parse_args()
    try:
        spec, overrides = apply_overrides(pool_size(args.pool, "full"), args.set)
    except UserError as exc:
        parser.error(str(exc))

    from evomerge.cli.process import set_up_process
    from evomerge.pool.training import make_tokenizer

    set_up_process(threads=1)
    skills = POOLS[args.pool]
    tokenizer = make_tokenizer()
    states, seconds = train_variant(skills, spec, tokenizer)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_folders(Path(tmp) / "models", spec, states, tokenizer)
        scorer = Scorer(Path(tmp), args.pool, skills, folders["base"])
        rows = {}
        for name in ("base", *skills):
            scorer.load(states[name])
            rows[name] = scorer.score()
        merge_rows, picks = score_merges(scorer, folders, skills)
    seconds["scoring"] = time.perf_counter() - started
    rows |= merge_rows
    result = {
        "pool": args.pool,
        "overrides": overrides,
        "spec": dataclasses.asdict(spec),
        "skills": list(skills),
        "rows": rows,
        "picks": picks,
        "summary": summary(rows, skills),
        "task_vectors": task_vector_stats(states, skills),
        "seconds": seconds,
    }
    print_block(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
