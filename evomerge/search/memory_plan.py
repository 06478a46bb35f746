"""The memory a search will hold, planned before anything loads (`evomerge plan CONFIG`).

From the pool's safetensors headers (shapes and dtypes; no tensor data is read), the run
config and its space, the plan adds up what a search keeps for its whole run on its device:

    base            the base's merged tensors, in the merge dtype
    task vectors    one per source, tau_i = theta_i - theta_base (the fused kernel and RegMean
                    keep task vectors only; a method run by torch ops keeps the sources, and
                    its task vectors where it forms them)
    TIES tables     a magnitude table of 2^15 int64 (256 KiB) per source per tensor of 65,536
                    elements or more, kept once a trial asks a density below 1: each trial's
                    top-k starts from it (`kernel.task_vectors.MAGNITUDE_TABLE_MIN`; on a GPU
                    it is kept in host memory, counted here on the device: 0.4% of the task
                    vectors)
    TIES ranks      on the CPU, int32 magnitude ranks per element per source of the smaller
                    tensors (no larger than a table; `MergeInputs.magnitude_ranks`); a GPU
                    keeps none: it finds each trial's cut on the device
    TIES selection  on a GPU, the workspace of that per-trial cut, one tensor at a time: 12
                    bytes per 1024 elements, and histograms of up to 2^22 elements (float32
                    tensors, tensors without a table; `kernel.triton_merge.top_magnitudes`)
    DARE tables     a draw table of (2^16 + 1) int64 per source per tensor of 1M elements or
                    more (`kernel.task_vectors.DRAW_TABLE_MIN`)
    RegMean         the projected task vectors (float32, one per source) and, while one
                    tensor's projections are made, each model's input statistics of that
                    tensor ((in, in) float32 per linear weight, a row vector for an embedding)
    live model      the evaluation model, the base in the pool's dtype (float32 if none); with
                    the vLLM backend and a parameter space, only the buffers each tensor is
                    merged into as the engine loads it (about one layer and the embedding)
    engine          with the vLLM backend, the engine's own copy of the weights
    activations     an allowance, not a measurement: the KV cache and the float32 logits of
                    one batch (fitness.batch_size sequences of fitness.max_length tokens; if
                    unset, 512 or the model's context where shorter)

and the bytes one trial moves (every resident input read once, the merged tensors written
once). `evomerge search` runs the same plan at start-up and refuses a run that cannot fit.

Tiers (`search.tier`): in the device tier all of the above is on the device. In the host tier
(a parameter space) the device holds the live model, the engine, the allowance, TIES's
selection workspace and one staging buffer (the largest tensor's operands: its base and task
vectors; on a GPU the largest two consecutive tensors', the next one's copy overlapping this
one's merge: `kernel.task_vectors.Staging`); host memory holds the rest, and a trial copies every
streamed tensor's operands over the host link (a kernel-less method's tensors are merged on
the host, their results pushed). `auto` picks the device tier where it fits, else the host
tier; a config that fits neither is refused. On the CPU both tiers share one memory.
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
STAGE_ALIGN = 256  # each operand's place in the host tier's staging buffer starts at a multiple
ASSUMED_LINK = 25e9  # bytes per second host to GPU, said as assumed where none is measured
# on the device in either tier
DEVICE_LABELS = ("live model", "engine weights", "activations", "TIES selection")


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
    tier: str = "device"
    host_items: list[Item] = field(default_factory=list)  # the host tier's host memory
    host_available: int | None = None
    host_available_from: str = ""
    staged: list[int] | None = None  # each streamed tensor's operands (aligned), in merge order
    link_bytes: int = 0  # the host tier: bytes a trial copies over the host link
    link_bandwidth: float | None = None  # bytes per second over that link, measured here
    chosen: str = ""  # why this tier (auto)
    device_tier: MemoryPlan | None = None  # the host tier's plan: the device tier it replaced
    host_plan: MemoryPlan | None = None  # the device tier's plan: its host tier, where streamed

    @property
    def host_total(self) -> int:
        return sum(item.bytes for item in self.host_items)

    @property
    def shared(self) -> bool:
        """Whether the host tier's two memories are one (a CPU device)."""
        return self.tier == "host" and not self.device.startswith("cuda")

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def fits(self) -> bool:
        if self.shared:
            return self.available is None or self.total + self.host_total <= self.available
        device = self.available is None or self.total <= self.available
        host = self.host_available is None or self.host_total <= self.host_available
        return device and host

    @property
    def largest(self) -> Item:
        return max(self.items, key=lambda item: item.bytes)

    def item(self, label: str) -> Item | None:
        return next((item for item in self.items if item.label == label), None)

    def lines(self) -> list[str]:
        """The plan as a table, for `evomerge plan`."""
        out = [
            f"memory plan: {self.method}, {self.sources} sources, merge dtype {self.merge_dtype}, "
            f"device {self.device}; one model-size = {human(self.model_bytes)}; "
            f"tier {self.tier}{f' ({self.chosen})' if self.chosen else ''}"
        ]
        if self.tier == "host":
            out.append(f"on {self.device} (the live model and one staging buffer):")
        out += self._table(self.items)
        if self.tier == "host":
            out.append("in host memory" + (" (the same memory)" if self.shared else "") + ":")
            out += self._table(self.host_items)
        line = f"one trial moves {human(self.trial_bytes)}"
        if self.bandwidth:
            seconds = self.trial_bytes / self.bandwidth
            line += (
                f"; at {human(self.bandwidth)}/s (a copy measured here) the merge takes at "
                f"least {seconds:.3g} s a trial"
            )
        out.append(line)
        if self.tier == "host":
            line = f"over the host link a trial copies {human(self.link_bytes)}"
            if self.link_bandwidth:
                line += (
                    f"; at {human(self.link_bandwidth)}/s (a copy measured here) that takes at "
                    f"least {self.link_bytes / self.link_bandwidth:.3g} s a trial"
                )
            elif self.bandwidth is not None or self.device.startswith("cuda"):
                line += (
                    f"; not measured here (no such GPU): at {human(ASSUMED_LINK)}/s (PCIe 4.0 "
                    f"x16) about {self.link_bytes / ASSUMED_LINK:.3g} s a trial"
                )
            out.append(line)
        out += [f"note: {note}" for note in self.notes]
        if self.available is None:
            out.append("available memory unknown: give it with --memory, e.g. --memory 80GB")
        elif self.fits:
            held = self.total + (self.host_total if self.shared else 0)
            line = f"fits: {human(held)} of {human(self.available)} available"
            line += f" ({self.available_from})"
            if self.tier == "host" and not self.shared:
                line += f", {human(self.host_total)} in host memory"
                if self.host_available is not None:
                    line += f" of {human(self.host_available)} ({self.host_available_from})"
            out.append(line)
        else:
            out.append(self.refusal())
        return out

    def _table(self, items: list[Item]) -> list[str]:
        out = []
        for item in items:
            sizes = f"{item.bytes / self.model_bytes:5.2f}" if self.model_bytes else "    -"
            out.append(
                f"  {item.label:16s} {human(item.bytes):>10s}  {sizes} model-sizes  {item.note}"
            )
        total = sum(item.bytes for item in items)
        sizes = f"{total / self.model_bytes:5.2f}" if self.model_bytes else "    -"
        out.append(f"  {'total':16s} {human(total):>10s}  {sizes} model-sizes")
        return out

    def refusal(self) -> str:
        """One sentence: it does not fit, the largest item, and what would."""
        if self.tier == "host":
            return self._host_refusal()
        return (
            f"the search would hold {human(self.total)} on {self.device} but "
            f"{human(self.available or 0)} is available ({self.available_from}); the largest "
            f"item is the {self.largest.label} ({human(self.largest.bytes)}); "
            f"{self.what_would_fit()} (or skip this check with --no-memory-check)"
        )

    def _host_refusal(self) -> str:
        if self.shared:
            held = f"{human(self.total + self.host_total)} on {self.device}"
        else:
            host = "unknown" if self.host_available is None else human(self.host_available)
            held = (
                f"{human(self.total)} on {self.device} and {human(self.host_total)} in host "
                f"memory ({host} available)"
            )
        device = self.device_tier
        start = (
            f"the search fits neither tier: the device tier would hold {human(device.total)} "
            f"on {self.device} and the host tier {held}"
            if device is not None
            else f"the search in the host tier would hold {held}"
        )
        # the largest item of the memory that overflows (the device's, unless only the host's)
        over_device = self.shared or self.available is None or self.total > self.available
        largest = max(self.items if over_device else self.host_items, key=lambda item: item.bytes)
        return (
            f"{start}, but {human(self.available or 0)} is available on {self.device} "
            f"({self.available_from}); the largest item is the {largest.label} "
            f"({human(largest.bytes)}); {(device or self).what_would_fit()} (or skip this "
            f"check with --no-memory-check)"
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
        host = self.host_plan
        if host is not None and host.fits:  # `search.tier: device` was asked for
            options.insert(
                0,
                f"`search.tier: host` (or auto) would hold {human(host.total)} on "
                f"{self.device} and {human(host.host_total)} in host memory",
            )
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
    host_memory: int | None = None,
    measure_bandwidth: bool = False,
) -> MemoryPlan:
    """The plan of a search over `config` in its tier (`search.tier`; `auto`: the device tier
    where it fits, else the host tier), against `memory` bytes on the device (default: what it
    has free now) and `host_memory` in host memory (default: what the host has available)."""
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
    tier = getattr(config.search, "tier", "auto")
    host = host_tier(plan)
    if host is not None:
        if host_memory is not None:
            host.host_available, host.host_available_from = host_memory, "given with --host-memory"
        elif not host.shared:
            host.host_available, host.host_available_from = free_memory("cpu")
    if tier == "host" and host is None:
        raise UserError(
            f"search.tier: host streams a parameter space's merges; a {plan.method} space "
            "keeps its inputs on the device: set `tier: device` (or auto)"
        )
    # on the CPU the host tier holds the same and a staging buffer more in the same memory
    streamable = host is not None and not host.shared
    if streamable:
        summary = (
            f"per tier: the device tier holds {human(plan.total)} on {plan.device}; the host "
            f"tier {human(host.total)} there and {human(host.host_total)} in host memory, and "
            f"copies {human(host.link_bytes)} a trial over the host link"
        )
        plan.notes.append(summary)
        host.notes.append(summary)
        plan.host_plan = host
    if tier == "host" or (tier == "auto" and not plan.fits and streamable):
        if tier == "auto":
            host.chosen = (
                f"auto: the device tier would hold {human(plan.total)} of "
                f"{human(plan.available or 0)}"
            )
        plan = host
    elif tier == "auto":
        plan.chosen = "auto: it fits" if plan.available is not None else "auto"
    if measure_bandwidth:
        plan.bandwidth = copy_bandwidth(config.device)
        if plan.tier == "host":
            plan.link_bandwidth = link_bandwidth(config.device)
    return plan


def host_tier(plan: MemoryPlan) -> MemoryPlan | None:
    """The host tier of a device-tier `plan` (None for a space that is not streamed): the
    device keeps the live model, the engine, the allowance and the staging buffer; host memory
    the prepared inputs."""
    if plan.staged is None:
        return None
    gpu = plan.device.startswith("cuda")
    items = [item for item in plan.items if item.label in DEVICE_LABELS]
    host_items = [item for item in plan.items if item.label not in DEVICE_LABELS]
    buffer = staging_bytes(plan.staged, pairs=gpu)
    note = (
        "two consecutive tensors' operands: the next one copied beside this one's merge"
        if gpu
        else "the largest tensor's operands, copied in before its merge"
    )
    items.insert(1, Item("staging", buffer, note))
    return MemoryPlan(
        device=plan.device,
        method=plan.method,
        sources=plan.sources,
        merge_dtype=plan.merge_dtype,
        items=items,
        trial_bytes=plan.trial_bytes,
        model_bytes=plan.model_bytes,
        available=plan.available,
        available_from=plan.available_from,
        notes=list(plan.notes),
        tier="host",
        host_items=host_items,
        staged=plan.staged,
        link_bytes=plan.link_bytes,
        device_tier=plan,
    )


def staging_bytes(sizes: list[int], *, pairs: bool) -> int:
    """The staging buffer (`kernel.task_vectors.staging_bytes`): the largest tensor's operands
    or, with `pairs` (a GPU), the largest two consecutive tensors' together."""
    if not sizes:
        return 0
    largest = max(sizes)
    if pairs and len(sizes) > 1:
        largest = max(largest, max(a + b for a, b in zip(sizes, sizes[1:])))
    return largest


def resolve_tier(config: RunConfig) -> str:
    """The tier a search over `config` runs in: `search.tier`, or for `auto` the plan's choice
    against what the device has free now plus what this process holds there already (the
    live model, which the plan counts)."""
    tier = getattr(config.search, "tier", "auto")
    if tier != "auto" or not config.device.startswith("cuda"):
        return "device" if tier == "auto" else tier
    import torch

    free, _ = free_memory(config.device)
    held = torch.cuda.memory_allocated(torch.device(config.device))
    return plan_memory(config, memory=(free or 0) + held).tier


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
    merged_at_push = backend == "vllm" and getattr(space, "kind", None) == "parameters"
    if merged_at_push:
        # the candidate's merges run as the engine takes each tensor (fitness.vllm_backend.
        # EngineMerge): the engine's weights are the live model's only full copy, beside
        # reusable buffers for one layer's tensors and the largest tensor outside the layers
        from evomerge.io.checkpoint import layer_index

        sizes: dict[int | None, list[int]] = {}
        for n in base_ckpt.names:
            if _floating(base_ckpt.dtype_name(n)):
                size = _numel(base_ckpt.shape(n)) * _itemsize(live_dtype)
                sizes.setdefault(layer_index(n), []).append(size)
        outside = sizes.pop(None, [])
        buffers = max(outside, default=0) + max(map(sum, sizes.values()), default=0)
        plan.items.append(Item("live model", buffers, "buffers of one layer's merged tensors"))
    else:
        plan.items.append(Item("live model", live, f"the evaluation model, in {live_dtype}"))
    if backend == "vllm":
        note = "vLLM's weights: the live model" if merged_at_push else "vLLM's copy of the weights"
        plan.items.append(Item("engine weights", live, note))
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
    sizes.update(selection=0, projected=0, statistics=0, trial=0, link=0)
    staged = []  # the host tier: each streamed tensor's operands, aligned as the buffer lays them
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
        streamed = len(staged)
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
            operands = [tensor] * (n + 1)  # TIES's tables stay in host memory: none staged
            staged.append(sum(_aligned(size) for size in operands))
            sizes["link"] += sum(operands)
            gpu, tabled = device.startswith("cuda"), numel >= MAGNITUDE_TABLE_MIN
            if rules.sparsify == "magnitude" and not (gpu or tabled):
                rank = 4 if numel < 2**31 else 8
                sizes["ranks"] += n * numel * rank
                read += n * numel * rank
            elif rules.sparsify == "magnitude":  # the top-k's scans: a pass over each task vector,
                sizes["magnitude"] += n * MAGNITUDE_TABLE_BYTES if tabled else 0  # two in float32
                read += n * tensor * (2 if size == 4 or not tabled else 1)  # or without a table
                if gpu:  # the cut's workspace (kernel.triton_merge.top_magnitudes)
                    sliced = 0 if size == 2 and tabled else 16 * min(numel, 1 << 22)
                    selection = -(-numel // 1024) * 12 + sliced
                    sizes["selection"] = max(sizes["selection"], selection)
            elif rules.sparsify == "random" and numel >= DRAW_TABLE_MIN:
                sizes["tables"] += n * DRAW_TABLE_BYTES
        else:
            sizes["sources"] += n * tensor
            read = n * tensor
            if rules is not None and job.base is not None:
                sizes["task"] += n * tensor  # formed by the torch code and kept with the inputs
        sizes["trial"] += read + (tensor if job.base is not None else 0) + tensor  # + the write
        if len(staged) == streamed:  # not streamed: the host tier merges it on the host
            sizes["link"] += tensor  # and pushes the result
    merge_dtype = "/".join(sorted(dtypes)) if dtypes else "-"
    model_bytes = _merged_bytes(merge_plan, forced)
    described = (  # size key, item label, what it is; in the order the plan prints them
        ("base", "base", "the base's merged tensors, in the merge dtype"),
        ("sources", "sources", f"{method.name} runs as torch ops: sources kept"),
        ("task", "task vectors", "one per source"),
        ("ranks", "TIES ranks", "int32 magnitude ranks per source"),
        ("magnitude", "TIES tables", "magnitude tables per source, not ranks"),
        ("selection", "TIES selection", "a trial's magnitude cut on the device, per tensor"),
        ("tables", "DARE tables", "draw tables per source"),
        ("projected", "projected", "RegMean's float32 projections"),
        (
            "statistics",
            "statistics",
            "RegMean's Gram matrices of one tensor in float32, read when its projections are "
            "made (the files keep each distinct input once, in float16)",
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
        staged=staged,
        link_bytes=sizes["link"],
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


def link_bandwidth(device: str, size: int = 256 << 20) -> float | None:
    """Bytes per second the host tier copies from host memory into `device`'s staging buffer:
    from pinned memory into a GPU, best of three; on the CPU, a copy's bytes (half the
    read + write rate `copy_bandwidth` gives). None where this machine cannot measure it."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        src = torch.empty(size, dtype=torch.uint8).pin_memory()
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        best = _best_of_three(
            lambda: dst.copy_(src, non_blocking=True), lambda: torch.cuda.synchronize(device)
        )
        return size / best if 0 < best < math.inf else None
    both = copy_bandwidth(device, size)
    return both / 2 if both else None


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
        best = _best_of_three(lambda: dst.copy_(src), lambda: torch.cuda.synchronize(device))
    elif device == "cpu":
        src = bytearray(size)
        view = memoryview(bytearray(size))
        best = _best_of_three(lambda: view.__setitem__(slice(None), src))
    return 2 * size / best if 0 < best < math.inf else None


def _best_of_three(copy, sync=lambda: None) -> float:
    """The fewest seconds of three runs of `copy`, each fenced by `sync` (a device's queue)."""
    best = math.inf
    for _ in range(3):
        sync()
        start = time.perf_counter()
        copy()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


# --- small helpers -----------------------------------------------------------------------------
def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // STAGE_ALIGN) * STAGE_ALIGN


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
