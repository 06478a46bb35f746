"""The offline LoRA pool: a demo base and one PEFT LoRA adapter per skill.

The base is the one `build_pool` trains (same seeds, same steps: bit for bit the demo pool's
base). Each specialist is a LoRA adapter trained on the specialist's data stream with the base
frozen: every linear projection of the decoder layers gets A (r, in) and B (out, r), with PEFT's
initialisation (A Kaiming-uniform with a = sqrt(5), B zero, so training starts at the base) and
scaling (output = W x + (alpha / r) * B A x). The adapters are saved as PEFT saves them
(`adapter_config.json` + `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight`
names, `base_model_name_or_path` the pool's base), so PEFT, mergekit and evomerge all read them.

Layout written by `build_lora_pool(out_dir)`::

    out_dir/base/            HF folder (config.json, model.safetensors, tokenizer files)
    out_dir/<skill>/         one LoRA adapter per skill
                             (adapter_config.json, adapter_model.safetensors)
    out_dir/tasks/           lm-eval task YAMLs + dev and test data, as in the demo pool
    out_dir/pool.json        manifest; a specialist's model is `base+<skill>` (mergekit's syntax)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import UserError
from evomerge.pool import POOLS, SIZES, _save, specialist_batches, train_base, write_manifest
from evomerge.pool.tasks import write_tasks
from evomerge.pool.training import make_tokenizer, pool_size, train

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraSchedule:
    """The adapters' rank, alpha and training schedule for one pool size (LoRA takes a larger
    learning rate than a full fine-tune: its update starts at zero and has few parameters)."""

    rank: int
    alpha: int
    steps: int
    lr: float


SCHEDULES = {
    "full": LoraSchedule(rank=8, alpha=16, steps=300, lr=4e-3),
    "small": LoraSchedule(rank=4, alpha=8, steps=200, lr=1e-2),
}


def build_lora_pool(
    out_dir: str | Path, *, name: str = "demo", size: str = "full", force: bool = False
) -> dict[str, Any]:
    """Build the LoRA variant of pool `name` into `out_dir`; return the manifest written there.
    Deterministic (fixed seeds, one torch thread); nothing is left half-written on failure."""
    from evomerge.io.output import staged_output

    if name not in POOLS:
        raise UserError(f"unknown pool {name!r}; choose one of {', '.join(POOLS)}.")
    if size not in SIZES or size not in SCHEDULES:
        raise UserError(f"unknown pool size {size!r}; choose one of {', '.join(SCHEDULES)}.")
    out_dir = Path(out_dir).resolve()
    skills, spec, schedule = POOLS[name], pool_size(name, size), SCHEDULES[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster than two
    started = time.perf_counter()
    try:
        with staged_output(out_dir, force=force) as tmp:
            tokenizer = make_tokenizer()
            task_names = write_tasks(tmp / "tasks", name, skills)
            t0 = time.perf_counter()
            base, loss = train_base(skills, tokenizer, spec)
            _save(base, tokenizer, tmp / "base")
            losses, timings = {"base": loss}, {"base": time.perf_counter() - t0}
            for i, skill in enumerate(skills):
                t0 = time.perf_counter()
                torch.manual_seed(100 + i)
                adapted = add_lora(base, schedule)
                losses[skill] = train(
                    base,
                    specialist_batches(skills, [skill], tokenizer, spec, seed=10 + i),
                    steps=schedule.steps,
                    lr=schedule.lr,
                    batch=spec.batch,
                    warmup=spec.warmup,
                    label=f"{skill} (LoRA)",
                )
                save_adapter(adapted, schedule, tmp / skill, base_path=out_dir / "base")
                remove_lora(base, adapted)
                timings[skill] = time.perf_counter() - t0
            manifest = write_manifest(
                tmp,
                name=f"{name}-lora",
                size=size,
                models={s: f"base+{s}" for s in skills},
                skills=skills,
                task_names=task_names,
                spec=spec,
                losses=losses,
                timings=timings,
                started=started,
                lora=dataclasses.asdict(schedule) | {"target_modules": list(TARGET_MODULES)},
            )
    finally:
        torch.set_num_threads(threads)
    return manifest


class LoraLinear(torch.nn.Module):
    """PEFT's LoRA layer without dropout: y = W x + (alpha / r) * B (A x), W frozen."""

    def __init__(self, base_layer: torch.nn.Linear, schedule: LoraSchedule):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = torch.nn.Linear(base_layer.in_features, schedule.rank, bias=False)  # (r, in)
        self.lora_B = torch.nn.Linear(
            schedule.rank, base_layer.out_features, bias=False
        )  # (out, r)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        torch.nn.init.zeros_(self.lora_B.weight)  # the update starts at zero
        self.scaling = schedule.alpha / schedule.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def add_lora(
    model: torch.nn.Module,
    schedule: LoraSchedule,
    *,
    modules: tuple[str, ...] = TARGET_MODULES,
    layers: tuple[int, ...] | None = None,
) -> dict[str, LoraLinear]:
    """Freeze `model` and wrap each target projection (of `modules`, in decoder `layers`, all
    if None) in a LoraLinear; {module name: layer}."""
    from evomerge.io.checkpoint import layer_index

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    targets = [
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in modules
        and isinstance(module, torch.nn.Linear)
        and (layers is None or layer_index(name + ".weight") in layers)
    ]
    adapted = {}
    for name in targets:
        parent, child = _parent(model, name)
        adapted[name] = LoraLinear(getattr(parent, child), schedule)
        setattr(parent, child, adapted[name])
    return adapted


def remove_lora(model: torch.nn.Module, adapted: dict[str, LoraLinear]) -> None:
    """Put the frozen layers back: `model` is the base again, and trainable again."""
    for name, layer in adapted.items():
        parent, child = _parent(model, name)
        setattr(parent, child, layer.base_layer)
    for parameter in model.parameters():
        parameter.requires_grad_(True)


def save_adapter(
    adapted: dict[str, LoraLinear],
    schedule: LoraSchedule,
    folder: Path,
    *,
    base_path: Path,
    modules: tuple[str, ...] = TARGET_MODULES,
    layers: tuple[int, ...] | None = None,
) -> None:
    """Write the adapter as PEFT's `save_pretrained` does (its tensor names and config keys)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in adapted.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = (
            layer.lora_A.weight.detach().contiguous()
        )
        tensors[f"base_model.model.{name}.lora_B.weight"] = (
            layer.lora_B.weight.detach().contiguous()
        )
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_path),
        "r": schedule.rank,
        "lora_alpha": schedule.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(modules),
        "layers_to_transform": sorted(layers) if layers is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(
        json.dumps(config, indent=2) + "\n", encoding="utf-8"
    )


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, child = name.rpartition(".")
    return model.get_submodule(path), child
