"""The offline pools: a tiny base model and one specialist per synthetic skill.

One pool per entry of `skills.POOLS` (`demo`, `demo2`, `demo3`), built by `build_pool`, and
the LoRA variant of a pool (`lora.build_lora_pool`, `evomerge pool demo-lora`: the same base,
one adapter per skill). Every pool is deterministic (fixed seeds, one torch thread) and needs
no network. A skill's task is scored as its `Skill.output_type` says: a loglikelihood task by
greedy-match `acc`, a generate-until one (shift, a Caesar cipher) by `exact_match`.

Each pool has a character-level tokenizer (one token per character, BOS added by the
post-processor), a small `LlamaForCausalLM` base pretrained on the mix of its skills, and one
specialist per skill, fine-tuned briefly and gently from the base on that skill with a little
replay of the mix, so the specialists stay near the base and a merge can keep every skill.
Held-out dev and test sets, disjoint from every training example and from each other, are
written as lm-eval tasks (skills.py, tasks.py, training.py hold the parts).

Layout written by `build_pool(out_dir, name=...)`::

    out_dir/base/            HF folder (config.json, model.safetensors, tokenizer files)
    out_dir/<skill>/         one specialist per skill, same layout
    out_dir/tasks/           lm-eval task YAMLs + dev and test data (jsonl)
    out_dir/pool.json        manifest: models, skills, tasks, build settings and timings
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError
from evomerge.pool.skills import POOLS, Skill
from evomerge.pool.tasks import (
    N_DEV,
    N_TEST,
    TASK_PREFIX,
    held_out_prompts,
    repo_task_dir,
    task_name,
    write_tasks,
)
from evomerge.pool.training import (
    SIZES,
    Batches,
    PoolSize,
    make_model,
    make_tokenizer,
    pool_size,
    train,
)

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "MANIFEST_NAME",
    "N_DEV",
    "N_TEST",
    "POOLS",
    "SIZES",
    "TASK_PREFIX",
    "build_pool",
    "load_manifest",
    "make_tokenizer",
    "repo_task_dir",
]

MANIFEST_NAME = "pool.json"


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def specialist_batches(
    skills: dict[str, Skill],
    focus: list[str],
    tokenizer: PreTrainedTokenizerFast,
    spec: PoolSize,
    seed: int,
) -> Batches:
    """The training stream of a fine-tune from the base: `focus` skills plus replay of the mix."""
    return Batches(
        [skills[s] for s in focus],
        tokenizer,
        held_out=held_out_prompts(skills),
        seed=seed,
        mix=list(skills.values()),
        replay=spec.replay,
    )


def train_base(
    skills: dict[str, Skill], tokenizer: PreTrainedTokenizerFast, spec: PoolSize
) -> tuple[LlamaForCausalLM, float]:
    """The pool's base, pretrained on the mix of its skills, and its final loss."""
    base = make_model(spec, tokenizer, seed=0)
    everything = Batches(
        list(skills.values()), tokenizer, held_out=held_out_prompts(skills), seed=1
    )
    loss = train(
        base,
        everything,
        steps=spec.base_steps,
        lr=spec.base_lr,
        batch=spec.batch,
        warmup=spec.warmup,
        label="base",
    )
    return base, loss


def train_specialist(
    model: LlamaForCausalLM,
    base_state: dict[str, Any],
    skills: dict[str, Skill],
    skill: str,
    tokenizer: PreTrainedTokenizerFast,
    spec: PoolSize,
) -> float:
    """Fine-tune `model` from `base_state` into the specialist of `skill` (left in `model`); its
    final loss. The seeds follow the skill's place in the pool, so each specialist is the same
    whether built by `build_pool` or alone (bench/pool_variants.py)."""
    import torch

    index = list(skills).index(skill)
    model.load_state_dict(base_state)
    torch.manual_seed(100 + index)
    return train(
        model,
        specialist_batches(skills, [skill], tokenizer, spec, seed=10 + index),
        steps=spec.spec_steps,
        lr=spec.spec_lr,
        batch=spec.batch,
        warmup=spec.warmup,
        label=skill,
    )


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder.")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} already exists and is not empty; pass --force to replace it.")


def build_pool(
    out_dir: str | Path, *, name: str = "demo", size: str = "full", force: bool = False
) -> dict[str, Any]:
    """Build the pool `name` into `out_dir`; return the manifest that is also written there.

    The folder is assembled under a temporary sibling and renamed into place at the end, so a
    failed or interrupted build leaves nothing half-written.
    """
    if name not in POOLS:
        raise UserError(f"unknown pool {name!r}; choose one of {', '.join(POOLS)}.")
    if size not in SIZES:
        raise UserError(f"unknown pool size {size!r}; choose one of {', '.join(SIZES)}.")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)

    import torch

    skills, spec = POOLS[name], pool_size(name, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster than two
    started = time.perf_counter()
    tmp = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer = make_tokenizer()
        task_names = write_tasks(tmp / "tasks", name, skills)
        timings: dict[str, float] = {}
        losses: dict[str, float] = {}

        t0 = time.perf_counter()
        base, losses["base"] = train_base(skills, tokenizer, spec)
        _save(base, tokenizer, tmp / "base")
        timings["base"] = time.perf_counter() - t0
        base_state = {k: v.clone() for k, v in base.state_dict().items()}

        for skill in skills:
            t0 = time.perf_counter()
            losses[skill] = train_specialist(base, base_state, skills, skill, tokenizer, spec)
            _save(base, tokenizer, tmp / skill)
            timings[skill] = time.perf_counter() - t0

        manifest = write_manifest(
            tmp,
            name=name,
            size=size,
            models={s: s for s in skills},
            skills=skills,
            task_names=task_names,
            spec=spec,
            losses=losses,
            timings=timings,
            started=started,
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return manifest


def write_manifest(
    folder: Path,
    *,
    name: str,
    size: str,
    models: dict[str, str],
    skills: dict,
    task_names: list[str],
    spec: Any,
    losses: dict[str, float],
    timings: dict[str, float],
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    """Write `folder`/pool.json (what `load_manifest` reads) and return it; `models` maps each
    skill to its folder (or `base+<adapter>`), `extra` adds pool-specific sections."""
    manifest = {
        "format": "evomerge-pool/2",
        "name": name,
        "size": size,
        "base": "base",
        "models": {"base": "base", **models},
        "skills": {
            s.name: {
                "model": s.name,
                "task": task_name(s),
                "metric": s.metric,
                "description": s.description,
            }
            for s in skills.values()
        },
        "task_path": "tasks",
        "tasks": task_names,
        "splits": {"search": "dev", "report": "test"},
        "settings": dataclasses.asdict(spec),
        **extra,
        "final_loss": {k: round(v, 5) for k, v in losses.items()},
        "seconds": {k: round(v, 2) for k, v in timings.items()}
        | {"total": round(time.perf_counter() - started, 2)},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def load_manifest(pool_dir: str | Path) -> dict[str, Any]:
    """Read `pool.json` of a built pool, with model and task paths made absolute."""
    pool_dir = Path(pool_dir)
    path = pool_dir / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"{pool_dir} is not an evomerge pool (no {MANIFEST_NAME}); build one "
            "with `evomerge pool demo DIR` (or demo2, demo-lora)."
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["models"] = {k: _absolute(pool_dir, v) for k, v in manifest["models"].items()}
    manifest["task_path"] = str((pool_dir / manifest["task_path"]).resolve())
    return manifest


def _absolute(pool_dir: Path, reference: str) -> str:
    """A model reference of the manifest made absolute: a folder, or `base+adapter` (LoRA pools)."""
    from evomerge.io.checkpoint import reference_parts

    return "+".join(
        str((pool_dir / part).resolve()) for part in reference_parts(reference, base_dir=pool_dir)
    )
