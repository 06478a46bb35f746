"""The memory a search will hold, planned before anything loads (`evomerge plan CONFIG`).

From the pool's safetensors headers (shapes and dtypes; no tensor data is read), the run
config and its space, the plan adds up what a search keeps for its whole run on its device:

    base            the base's merged tensors, in the merge dtype
    task vectors    one per source, tau_i = theta_i - theta_base (the fused kernel and RegMean
                    keep task vectors only; a method run by torch ops keeps the sources, and
                    its task vectors where it forms them)
    TIES tables     on the CPU, a magnitude table of 2^15 int64 (256 KiB) per source per tensor
                    of 65,536 elements or more, kept once a trial asks a density below 1: each
                    trial's top-k starts from it (`kernel.task_vectors.MAGNITUDE_TABLE_MIN`)
    TIES ranks      int32 magnitude ranks per element per source of the smaller tensors (no
                    larger than a table), and of every tensor on a GPU, whose kernel has no
                    radix select (`MergeInputs.magnitude_ranks`)
    DARE tables     a draw table of (2^16 + 1) int64 per source per tensor of 1M elements or
                    more (`kernel.task_vectors.DRAW_TABLE_MIN`)
    RegMean         the projected task vectors (float32, one per source) and, while one
                    tensor's projections are made, each model's input statistics of that
                    tensor ((in, in) float32 per linear weight, a row vector for an embedding)
    live model      the evaluation model, the base in the pool's dtype (float32 if none)
    engine          with the vLLM backend, the engine's own copy of the weights
    activations     an allowance, not a measurement: the KV cache and the float32 logits of
                    one batch (fitness.batch_size sequences of fitness.max_length tokens; if
                    unset, 512 or the model's context where shorter)

and the bytes one trial moves (every resident input read once, the merged tensors written
once). `evomerge search` runs the same plan at start-up and refuses a run that cannot fit.
Spaces of another kind than `parameters` (dataflow, staged) are planned as their sources kept
whole: an estimate.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import UserError
from evomerge.io.dtypes import CODES, ITEMSIZE

if TYPE_CHECKING:
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.search.config import RunConfig

# Mirrors of the kernel's constants (tests/test_plan.py checks they agree), so that planning
# needs no kernel: DARE keeps a draw table per source for tensors this large, of this size.
DRAW_TABLE_MIN = 1 << 20
DRAW_TABLE_BYTES = ((1 << 16) + 1) * 8
# TIES on the CPU: tensors this large keep a magnitude table of this size per source, not ranks.
MAGNITUDE_TABLE_MIN = 1 << 16
MAGNITUDE_TABLE_BYTES = (1 << 15) * 8
DEFAULT_SEQUENCE = 512  # tokens per sequence in the allowance without max_length (or less context)
FUSED_RULES = (None, "magnitude", "random")
MAX_MODELS = 64  # the most sources the fused kernel merges at once


@dataclass(frozen=True)
class Item:
    """One thing the search holds: its label, bytes and what it is."""

    label: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """What a search over a config holds on its device, and the bytes one trial moves."""

    device: str
    method: str
    sources: int
    merge_dtype: str
    items: list[Item]
    trial_bytes: int
    model_bytes: int  # the merged tensors of one model in the merge dtype: the "model-size"
    available: int | None = None
    available_from: str = ""
    bandwidth: float | None = None  # bytes per second, measured on this machine
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    @property
    def largest(self) -> Item:
        return max(self.items, key=lambda item: item.bytes)

    def item(self, label: str) -> Item | None:
        return next((item for item in self.items if item.label == label), None)

    def lines(self) -> list[str]:
        """The plan as a table, for `evomerge plan`."""
        out = [
            f"memory plan: {self.method}, {self.sources} sources, merge dtype {self.merge_dtype}, "
            f"device {self.device}; one model-size = {human(self.model_bytes)}"
        ]
        for item in self.items:
            sizes = f"{item.bytes / self.model_bytes:5.2f}" if self.model_bytes else "    -"
            out.append(
                f"  {item.label:16s} {human(item.bytes):>10s}  {sizes} model-sizes  {item.note}"
            )
        total = f"{self.total / self.model_bytes:5.2f}" if self.model_bytes else "    -"
        out.append(f"  {'total':16s} {human(self.total):>10s}  {total} model-sizes")
        line = f"one trial moves {human(self.trial_bytes)}"
        if self.bandwidth:
            seconds = self.trial_bytes / self.bandwidth
            line += (
                f"; at {human(self.bandwidth)}/s (a copy measured here) the merge takes at "
                f"least {seconds:.3g} s a trial"
            )
        out.append(line)
        out += [f"note: {note}" for note in self.notes]
        if self.available is None:
            out.append("available memory unknown: give it with --memory, e.g. --memory 80GB")
        elif self.fits:
            out.append(
                f"fits: {human(self.total)} of {human(self.available)} available "
                f"({self.available_from})"
            )
        else:
            out.append(self.refusal())
        return out

    def refusal(self) -> str:
        """One sentence: it does not fit, the largest item, and what would."""
        return (
            f"the search would hold {human(self.total)} on {self.device} but "
            f"{human(self.available or 0)} is available ({self.available_from}); the largest "
            f"item is the {self.largest.label} ({human(self.largest.bytes)}); "
            f"{self.what_would_fit()} (or skip this check with --no-memory-check)"
        )

    def what_would_fit(self) -> str:
        """The changes that would fit, computed from the items: a 16-bit merge dtype, a space
        without TIES's ranks, fewer sources; alone, then together."""
        available = self.available or 0
        changes = []
        if self.merge_dtype in ("float32", "float64"):
            factor = 2 / _itemsize(self.merge_dtype)  # what bfloat16 makes of these items
            changes.append(
                (
                    "pool dtype bfloat16",
                    lambda item: item.bytes * (factor if item.label in HALVED_BY_DTYPE else 1),
                )
            )
        if self.item("TIES ranks") is not None:
            changes.append(
                (
                    "a task-arithmetic or DARE-TIES space (no ranks)",
                    lambda item: 0 if item.label in ("TIES ranks", "TIES tables") else item.bytes,
                )
            )
        options = []
        for name, change in changes:
            total = sum(change(item) for item in self.items)
            if total <= available:
                options.append(f"{name} would need {human(total)}")
        combos = [("", lambda item: item.bytes)] + changes
        if len(changes) > 1:
            both = " and ".join(name for name, _ in changes)
            combos.append((both, lambda item: changes[1][1](Item(item.label, changes[0][1](item)))))
        for name, change in combos:
            most = self._most_sources(change, available)
            if 1 <= most < self.sources:
                plural = "s" if most > 1 else ""
                options.append(f"{most} source{plural}{f' with {name}' if name else ''} would fit")
                break
        if not options:
            return (
                "no smaller dtype or source count fits this device: use a device with more memory"
            )
        return "; ".join(options)

    def _most_sources(self, change, available: int) -> int:
        """The most sources whose plan, with `change` made to each item, fits `available`."""
        per_source = sum(change(i) for i in self.items if i.label in PER_SOURCE) / max(
            self.sources, 1
        )
        fixed = sum(change(i) for i in self.items if i.label not in PER_SOURCE)
        return int((available - fixed) // per_source) if per_source else self.sources


# items that grow with each source, and items a 16-bit pool dtype halves (from float32)
PER_SOURCE = (
    "task vectors",
    "sources",
    "TIES ranks",
    "TIES tables",
    "DARE tables",
    "projected",
    "statistics",
)
HALVED_BY_DTYPE = ("base", "task vectors", "sources", "live model", "engine weights")


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} TB"


# --- the plan ----------------------------------------------------------------------------------
def plan_memory(
    config: RunConfig,
    *,
    memory: int | None = None,
    measure_bandwidth: bool = False,
) -> MemoryPlan:
    """The plan of a search over `config`, against `memory` bytes (default: what the device
    has free now)."""
    from evomerge.merging.executor import check_device
    from evomerge.search.run_folder import build_space

    if memory is None or not config.device.startswith("cuda"):  # a GPU elsewhere: --memory
        check_device(config.device)
    space = build_space(config)
    plan = plan_space(
        space,
        base=config.pool.base,
        live_dtype=config.pool.dtype or "float32",
        device=config.device,
        backend=config.fitness.backend,
        batch_size=config.fitness.batch_size,
        max_length=config.fitness.max_length,
    )
    if memory is not None:
        plan.available, plan.available_from = memory, "given with --memory"
    else:
        plan.available, plan.available_from = free_memory(config.device)
    if measure_bandwidth:
        plan.bandwidth = copy_bandwidth(config.device)
    return plan


def plan_space(
    space,
    *,
    base: str,
    live_dtype: str,
    device: str = "cpu",
    backend: str = "hf",
    batch_size: int = 64,
    max_length: int | None = None,
) -> MemoryPlan:
    """The items a search over `space` holds (see the module notes); headers only."""
    from evomerge.io.adapters import open_checkpoint
    from evomerge.io.checkpoint import reference_parts

    base_ckpt = open_checkpoint(base)
    if getattr(space, "kind", None) == "parameters":
        plan = _parameters_plan(space, device)
    elif isinstance(getattr(space, "spaces", None), dict):  # a method per group: one compiled
        plan = _sum_plans(
            [_parameters_plan(sub, device) for sub in space.spaces.values()]
        )  # per method
    else:
        plan = _whole_model_plan(space, base_ckpt)
    plan.device = device
    tables = plan.item("DARE tables")
    if device.startswith("cuda") and tables is not None:  # built on the GPU, kept on the host
        plan.items.remove(tables)
        plan.notes.append(f"DARE's draw tables ({human(tables.bytes)}) are kept in host memory")
    references = list((getattr(space, "models", None) or {}).values())
    if any(len(reference_parts(str(r))) == 2 for r in references):
        plan.notes.append(
            "LoRA adapter sources are planned as full task vectors; a search keeps their "
            "factors, which are smaller"
        )
    live = sum(
        _numel(base_ckpt.shape(n))
        * (
            _itemsize(live_dtype)
            if _floating(base_ckpt.dtype_name(n))
            else _code_size(base_ckpt, n)
        )
        for n in base_ckpt.names
    )
    plan.items.append(Item("live model", live, f"the evaluation model, in {live_dtype}"))
    if backend == "vllm":
        plan.items.append(Item("engine weights", live, "vLLM's own copy of the weights"))
        plan.notes.append(
            "vLLM also reserves its KV cache, up to its gpu_memory_utilization of the GPU "
            "(default 0.9): set it so that the other items fit beside the engine"
        )
    plan.items.append(
        Item(
            "activations",
            activation_allowance(base_ckpt.config, live_dtype, batch_size, max_length),
            f"an allowance: KV cache and float32 logits of {batch_size} sequences of "
            f"{sequence_length(base_ckpt.config, max_length)} tokens",
        )
    )
    return plan


def _parameters_plan(space, device: str = "cpu") -> MemoryPlan:
    import copy

    from evomerge.spaces.parameters.candidate import compile_slots

    if getattr(space.method, "statistics", False) and not space.statistics:
        # RegMean's recipes name statistics files, which the search writes when it starts; the
        # layout needs files that exist, never their data (opened lazily): any of the model's
        # own safetensors files stands in.
        space = copy.copy(space)
        space.statistics = {
            reference: str(next(iter(sorted(_folder(reference).glob("*.safetensors")))))
            for reference in space.models.values()
        }
    merge_plan, _ = compile_slots(space)  # the plan a candidate compiles: headers only
    method = merge_plan.method
    rules = method.task_vectors
    forced = merge_plan.recipe.dtype
    sizes = {"base": 0, "task": 0, "sources": 0, "ranks": 0, "magnitude": 0, "tables": 0}
    sizes.update(projected=0, statistics=0, trial=0)
    sources = 0
    dtypes = set()
    kernel_on = os.environ.get("EVOMERGE_KERNEL", "on").lower() not in ("off", "0", "false")
    for job in merge_plan.jobs:
        refs = list(job.inputs) + ([job.base] if job.base else [])
        ckpts = [merge_plan.checkpoints[r.model] for r in refs]
        codes = [c.dtype_name(r.name) for c, r in zip(ckpts, refs)]
        size = _itemsize(forced) if forced else max(ITEMSIZE[c] for c in codes)
        dtypes.add(forced or _promoted(codes))
        numel = _numel(ckpts[-1].shape(refs[-1].name))
        n = len(job.inputs)
        sources = max(sources, n)
        tensor = numel * size
        fused = (
            job.base is not None
            and rules is not None
            and rules.sparsify in FUSED_RULES
            and _itemsize_name(forced or _promoted(codes)) in (2, 4)
            and n <= MAX_MODELS
            and numel < 2**31
            and kernel_on
        )
        if job.base is not None:
            sizes["base"] += tensor
        if method.name == "regmean" and job.base is not None:
            sizes["task"] += n * tensor
            sizes["projected"] += n * numel * 4
            # read per tensor when its projections are made, then freed: the largest one
            grams = n * _gram_bytes(job.out_name, ckpts[-1].shape(refs[-1].name))
            sizes["statistics"] = max(sizes["statistics"], grams)
            read = n * numel * 4
        elif fused:
            sizes["task"] += n * tensor
            read = n * tensor
            if rules.sparsify == "magnitude" and (
                device.startswith("cuda") or numel < MAGNITUDE_TABLE_MIN
            ):
                rank = 4 if numel < 2**31 else 8
                sizes["ranks"] += n * numel * rank
                read += n * numel * rank
            elif rules.sparsify == "magnitude":  # the top-k's scans: at most one pass over each
                sizes["magnitude"] += n * MAGNITUDE_TABLE_BYTES  # task vector, two in float32
                read += n * tensor * (2 if size == 4 else 1)
            elif rules.sparsify == "random" and numel >= DRAW_TABLE_MIN:
                sizes["tables"] += n * DRAW_TABLE_BYTES
        else:
            sizes["sources"] += n * tensor
            read = n * tensor
            if rules is not None and job.base is not None:
                sizes["task"] += n * tensor  # formed by the torch code and kept with the inputs
        sizes["trial"] += read + (tensor if job.base is not None else 0) + tensor  # + the write
    merge_dtype = "/".join(sorted(dtypes)) if dtypes else "-"
    model_bytes = _merged_bytes(merge_plan, forced)
    described = (  # size key, item label, what it is; in the order the plan prints them
        ("base", "base", "the base's merged tensors, in the merge dtype"),
        ("sources", "sources", f"{method.name} runs as torch ops: sources kept"),
        ("task", "task vectors", "one per source"),
        ("ranks", "TIES ranks", "int32 magnitude ranks per source"),
        ("magnitude", "TIES tables", "magnitude tables per source, not ranks"),
        ("tables", "DARE tables", "draw tables per source"),
        ("projected", "projected", "RegMean's float32 projections"),
        (
            "statistics",
            "statistics",
            "RegMean's Gram matrices of one tensor, read when its projections are made",
        ),
    )
    items = [Item(label, sizes[key], what) for key, label, what in described if sizes[key]]
    notes = []
    if rules is not None and rules.sparsify not in FUSED_RULES:
        notes.append(f"{method.name}'s per-tensor ranks and draws are not planned")
    return MemoryPlan(
        device="cpu",
        method=method.name,
        sources=sources,
        merge_dtype=merge_dtype,
        items=items,
        trial_bytes=sizes["trial"],
        model_bytes=model_bytes,
        notes=notes,
    )


def _sum_plans(plans: list[MemoryPlan]) -> MemoryPlan:
    """Plans held side by side (a candidate per method, each with its own prepared inputs)."""
    items: dict[str, Item] = {}
    for plan in plans:
        for item in plan.items:
            held = items.get(item.label)
            items[item.label] = Item(
                item.label,
                item.bytes + (held.bytes if held else 0),
                item.note if held is None else f"{item.note} (one set per method)",
            )
    first = plans[0]
    return MemoryPlan(
        device=first.device,
        method=" | ".join(plan.method for plan in plans),
        sources=max(plan.sources for plan in plans),
        merge_dtype=first.merge_dtype,
        items=list(items.values()),
        trial_bytes=max(plan.trial_bytes for plan in plans),  # each tensor merged by one method
        model_bytes=first.model_bytes,
        notes=sorted({note for plan in plans for note in plan.notes}),
    )


def _merged_bytes(merge_plan, forced: str | None) -> int:
    """Bytes of one model's merged tensors in the merge dtype (the unit of model-sizes)."""
    total = 0
    for job in merge_plan.jobs:
        ref = job.base or job.inputs[0]
        ckpt = merge_plan.checkpoints[ref.model]
        code = ckpt.dtype_name(ref.name)
        total += _numel(ckpt.shape(ref.name)) * (_itemsize(forced) if forced else ITEMSIZE[code])
    return total


def _whole_model_plan(space, base_ckpt: Checkpoint) -> MemoryPlan:
    """An estimate for spaces that are not parameter spaces: each source kept whole."""
    from evomerge.io.adapters import open_checkpoint

    dtype = getattr(space, "dtype", None)
    # a data-flow space's `sources` include the base (a copy of the live model per run)
    models = list((getattr(space, "sources", None) or getattr(space, "models", {})).values())
    model = sum(
        _numel(base_ckpt.shape(n)) * (_itemsize(dtype) if dtype else _code_size(base_ckpt, n))
        for n in base_ckpt.names
    )
    for reference in models:
        open_checkpoint(reference)  # headers: a missing model is said here
    kind = getattr(space, "kind", "?")
    items = [Item("sources", len(models) * model, f"{kind} space: each source kept whole")]
    if getattr(space, "sources", None) is None:  # a data-flow space's sources hold the base
        items.insert(0, Item("base", model, "the base, in the merge dtype"))
    return MemoryPlan(
        device="cpu",
        method=getattr(space, "title", kind),
        sources=len(models),
        merge_dtype=dtype or "checkpoint's",
        items=items,
        trial_bytes=sum(item.bytes for item in items) + model,  # each read once, one written
        model_bytes=model,
        notes=[f"a {kind} space is planned as its sources kept whole: an estimate"],
    )


def sequence_length(config: dict, max_length: int | None) -> int:
    """Tokens per sequence in the allowance: fitness.max_length, else DEFAULT_SEQUENCE or the
    model's context where that is shorter."""
    context = config.get("max_position_embeddings")
    if max_length:
        return max_length
    if isinstance(context, int) and not isinstance(context, bool) and context > 0:
        return min(context, DEFAULT_SEQUENCE)
    return DEFAULT_SEQUENCE


def activation_allowance(config: dict, dtype: str, batch_size: int, max_length: int | None) -> int:
    """KV cache and float32 logits of one batch: an allowance, stated, not measured."""
    tokens = batch_size * sequence_length(config, max_length)
    hidden = int(config.get("hidden_size") or 0)
    layers = next(
        (int(config[k]) for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), 0
    )
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    vocab = int(config.get("vocab_size") or 0)
    kv = tokens * layers * 2 * kv_heads * head_dim * _itemsize(dtype)
    return kv + tokens * vocab * 4


def _gram_bytes(name: str, shape: tuple[int, ...]) -> int:
    """RegMean's statistics of one tensor: (in, in) float32 for a linear weight, a float32 row
    vector for an embedding, none for a vector (evomerge/fitness/statistics.py)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return 0
    if any(part in name for part in ("embed", "wte", "wpe")):
        return shape[0] * 4
    return shape[1] * shape[1] * 4


# --- the device --------------------------------------------------------------------------------
def free_memory(device: str) -> tuple[int | None, str]:
    """Bytes free on `device` now, and where the figure comes from."""
    if device.startswith("cuda"):
        import torch

        from evomerge.merging.executor import check_device

        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} is not available: no CUDA GPU is visible")
        check_device(device)  # cuda:N of a GPU torch sees
        index = torch.device(device).index or 0
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"free on {device}"
    if device == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
        except OSError:
            pass
        try:
            pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            return pages * size, "free physical pages"
        except (OSError, ValueError):
            return None, ""
    return None, ""


def copy_bandwidth(device: str, size: int = 256 << 20) -> float | None:
    """Bytes per second a plain copy moves on `device` (read + write), best of three; None
    where this machine cannot measure it (a GPU planned for from a machine without one)."""
    best = math.inf
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        src = torch.empty(size, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        for _ in range(3):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    elif device == "cpu":
        src = bytearray(size)
        dst = bytearray(size)
        view = memoryview(dst)
        for _ in range(3):
            start = time.perf_counter()
            view[:] = src
            best = min(best, time.perf_counter() - start)
    return 2 * size / best if 0 < best < math.inf else None


# --- small helpers -----------------------------------------------------------------------------
def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _itemsize(dtype: str) -> int:
    return ITEMSIZE[CODES[dtype]]


def _itemsize_name(dtype: str) -> int:
    return _itemsize(dtype) if dtype in CODES else 0


def _code_size(ckpt: Checkpoint, name: str) -> int:
    return ITEMSIZE[ckpt.dtype_name(name)]


def _floating(code: str) -> bool:
    return code.startswith(("F", "BF"))


def _promoted(codes: list[str]) -> str:
    """The dtype torch promotes these safetensors dtypes to (float ones: the wider one; two
    different 16-bit ones: float32)."""
    from evomerge.io.dtypes import NAMES

    names = {NAMES[c] for c in codes}
    if len(names) == 1:
        return names.pop()
    if {"float16", "bfloat16"} <= names and not names & {"float32", "float64"}:
        return "float32"
    return max(names, key=lambda n: _itemsize(n))


def _folder(reference: str) -> Path:
    from evomerge.io.checkpoint import resolve_model_path

    return resolve_model_path(reference)
