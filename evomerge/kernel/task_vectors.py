"""The fused path of the task-vector family: task arithmetic, TIES and DARE in one pass.

`evomerge.methods.task_arithmetic` is the reference: torch ops that read like the papers. This
module computes the same merge, bit for bit (tests/test_kernel.py), in one pass over memory per
tensor: the C kernel on the CPU (`cpu.py`), the Triton kernel on CUDA GPUs (`triton_merge.py`).
The merge executor (`evomerge.merging.executor.PreparedTensor`) asks `prepare` whether the kernel
takes a tensor and otherwise calls the method itself.

Lifecycle: prepare once per run, merge per trial.
  - `prepare(method, inputs, resident=...)` once per output tensor, after its inputs are read.
  - `FusedTensor.merge(out=..., **parameters)` per merge, with the method's keyword arguments.
A `resident` tensor (the search: many merges of the same inputs) keeps, on first use, what does
not change between trials: its task vectors (in `MergeInputs`), TIES's magnitude tables (or, for
small tensors on the CPU, magnitude ranks), DARE's draw tables and the inputs' smallest
magnitudes (here). A one-shot tensor (`evomerge merge`) keeps nothing: task vectors are
subtracted on the fly and TIES's top-k is a radix select. On a GPU, TIES's cut is found per
merge on the device from the magnitude table (kept on the host: `triton_merge.top_magnitudes`),
so a GPU search keeps no magnitude ranks (they would take 4 bytes per element per source).

Two tiers hold a search's resident inputs. The device tier keeps them on the merge device. The
host tier (`prepare_host`, `Staging`) keeps them in host memory (pinned for a GPU) and copies
each tensor's operands (the base and the task vectors: nothing per element more for TIES) into one
bounded staging buffer on the device just before its merge, which reads them there and writes
the live model: the same kernel on the same values, so the same bits. On a GPU the copies run
on a side stream, the next tensor's copy beside this tensor's merge.
"""

from __future__ import annotations

import itertools
import logging
from functools import cache

import torch

from evomerge.kernel import cpu
from evomerge.kernel.rules import KeepRule, TaskVector
from evomerge.methods import sparsify
from evomerge.methods.random_fields import UniformField
from evomerge.methods.registry import MergeInputs, MergeMethod, Sparsifier, get_method
from evomerge.methods.task_arithmetic import task_vector_merge

LOG = logging.getLogger(__name__)

FUSED_RULES = (None, "magnitude", "random")  # breadcrumbs and della run the torch code
# Tensors at least this large keep a draw table for DARE's rescale when resident (512 KiB per
# task vector: at most half a byte per element); smaller ones sum in a pass per merge.
DRAW_TABLE_MIN = 1 << 20
# TIES in a search (resident): a task vector this large keeps its magnitude table
# (cpu.magnitude_table, 256 KiB, on the host) and finds each merge's top-k from it; a smaller
# one keeps, on the CPU, int32 magnitude ranks, which are then no larger than the table, and on
# a GPU nothing (its table is made per merge). Either way what is kept for TIES costs at most
# 256 KiB per task vector and tensor (not 4 bytes per element).
MAGNITUDE_TABLE_MIN = cpu.MAGNITUDE_TABLE_ENTRIES * 8 // 4
# Where no nonzero input to a product, and no nonzero product, falls below this, no value in
# a merge can be subnormal (see FusedTensor.subnormal_free).
NORMAL_FLOOR = 2.0**-99


def prepare(method: MergeMethod, inputs: MergeInputs, *, resident: bool) -> FusedTensor | None:
    """The kernel's state for merging `inputs` by `method`, or None where the kernel does not
    take them (another method or rule, another dtype or device, no kernel built)."""
    rules = method.task_vectors
    if rules is None or rules.sparsify not in FUSED_RULES or not inputs.models:
        return None
    if not applies([inputs.base, *inputs.models]):
        return None
    return FusedTensor(inputs, rule=rules.sparsify, consensus=rules.consensus, resident=resident)


def prepare_host(method: MergeMethod, inputs: MergeInputs, *, device: str) -> FusedTensor | None:
    """The host tier's kernel state: `inputs` (read into host memory) are kept there and merged
    on `device` from a `Staging` buffer (attached with `Staging(device, tensors)`); None where
    the kernel on `device` does not take them (the method then runs on the host)."""
    rules = method.task_vectors
    if rules is None or rules.sparsify not in FUSED_RULES or not inputs.models:
        return None
    if inputs.base is None:
        return None
    stand_ins = [m if m is not None else inputs.delta(i) for i, m in enumerate(inputs.models)]
    if not applies([inputs.base, *stand_ins], device=torch.device(device)):
        return None
    fused = FusedTensor(inputs, rule=rules.sparsify, consensus=rules.consensus, resident=True)
    fused.streamed = True
    return fused


def applies(tensors: list[torch.Tensor], *, device: torch.device | None = None) -> bool:
    """Whether a fused kernel takes these tensors (one shape, one dtype) on `device` (default:
    theirs): the C kernel on the CPU when it is built here, the Triton kernel on a CUDA GPU
    where it passed its self-check."""
    first = tensors[0]
    device = device or first.device
    if device.type == "cuda":
        return _fits_gpu(tensors) and gpu_ready(device, first.dtype)
    return device.type == "cpu" and cpu.fits(tensors)


def _fits_gpu(tensors: list[torch.Tensor]) -> bool:
    first = tensors[0]
    return (
        first.dtype in cpu.DTYPES
        and all(
            t.is_contiguous()
            and t.dtype == first.dtype
            and t.shape == first.shape
            and t.device == first.device
            for t in tensors
        )
        and first.numel() < 2**31
        and len(tensors) <= cpu.MAX_MODELS + 1
    )


def _on_gpu(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernel merges `tensor`: it is on a CUDA GPU. (The checks of this
    module's GPU path, run in Triton's CPU interpreter, say so of CPU tensors.)"""
    return tensor.is_cuda


class FusedTensor:
    """One output tensor of a task-vector merge, as the kernel merges it (see the module notes)."""

    def __init__(self, inputs: MergeInputs, *, rule: Sparsifier, consensus: bool, resident: bool):
        self.inputs, self.rule, self.consensus, self.resident = inputs, rule, consensus, resident
        self.count = len(inputs.models)
        if resident:  # tau_i is what every merge reads: theta_i would be a redundant copy
            inputs.keep_task_vectors_only()
        self._draw_tables: dict[int, torch.Tensor] = {}
        self._magnitude_tables: dict[int, torch.Tensor] = {}
        self.keeps_draw_tables = resident
        self._smallest: dict[int, float] = {}
        self.streamed = False  # the host tier's (`prepare_host`): merged from a Staging buffer
        self.stage: Stage | None = None  # its place there, once a Staging is made

    def keep_draw_tables(self, tables: dict[int, torch.Tensor]) -> None:
        """Keep DARE's draw tables in `tables`, which outlives this object: for one-shot inputs
        formed anew for each merge but equal in all of them (a LoRA adapter's tensor in a
        search, which keeps the adapter's factors and not its task vector:
        evomerge/merging/factored.py)."""
        self._draw_tables, self.keeps_draw_tables = tables, True

    def merge(
        self,
        *,
        weight: list[float],
        density: list[float],
        normalize: bool,
        rescale: bool,
        lambda_: float,
        int8_mask: bool = False,  # a mergekit memory option; it does not change the result
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """task_vector_merge's result (into `out` where the kernel can write there), and
        whether every value of it is finite (found in the same pass)."""
        base, taus = self.operands()
        dtype = base.dtype
        rules = self.keep_rules(taus, density)
        factors = [torch.ones((), dtype=dtype)] * self.count
        rescaled = [i for i in range(self.count) if rescale and not rules[i].keeps_all]
        for i, (after, before) in self.l1_norms(taus, rules, rescaled).items():
            factors[i] = sparsify.l1_factor(before, after, dtype)
        w = torch.tensor(weight, dtype=dtype)
        plain_divisor = w.sum()
        if plain_divisor.abs() < 1e-8:
            plain_divisor = torch.ones((), dtype=dtype)
        rescale_factors = torch.stack(factors)
        options = dict(
            consensus=self.consensus,
            normalize=normalize,
            plain_divisor=float(plain_divisor),
            lambda_=lambda_,
        )
        out = out if self.can_write(out, base) else torch.empty_like(base)
        if _on_gpu(base):
            from evomerge.kernel import triton_merge

            return triton_merge.tv_merge(base, taus, rules, rescale_factors, w, **options, out=out)
        subnormal_free = self.subnormal_free(rescale_factors, w)
        return cpu.tv_merge(
            base, taus, rules, rescale_factors, w, **options, out=out, subnormal_free=subnormal_free
        )

    def operands(self) -> tuple[torch.Tensor, list[TaskVector]]:
        """The base and task vectors the kernel reads: the resident ones, or in the host tier
        their copies in the staging buffer."""
        if self.stage is not None:
            base, *deltas = self.stage.operands()
            return base, [TaskVector(delta) for delta in deltas]
        return self.inputs.base, [self.task_vector(i) for i in range(self.count)]

    def host_operands(self) -> list[torch.Tensor]:
        """What the host tier copies to `device` for a merge: the base and the task vectors
        (TIES's tables stay on the host, where its cut is looked up)."""
        return [self.inputs.base, *(self.inputs.delta(i) for i in range(self.count))]

    def can_write(self, out: torch.Tensor | None, base: torch.Tensor | None = None) -> bool:
        """Whether the kernel can write the result into `out` (the live model's parameter in
        the search, a buffer lent by the output writer in a plain merge)."""
        base = self.inputs.base if base is None else base
        return (
            out is not None
            and out.dtype == base.dtype
            and out.shape == base.shape
            and out.is_contiguous()
            and out.device == base.device
        )

    def task_vector(self, index: int) -> TaskVector:
        """Resident: the stored tau_i; one-shot: theta_i and the base, subtracted on the fly."""
        if self.resident:
            return TaskVector(self.inputs.delta(index))
        return TaskVector(self.inputs.models[index], self.inputs.base)

    def keep_rules(self, taus: list[TaskVector], density: list[float]) -> list[KeepRule]:
        """`keep_rule` of every model; on a GPU TIES's cuts found together (one
        synchronisation for the tensor: triton_merge.top_magnitudes_of)."""
        if not (self.rule == "magnitude" and _on_gpu(taus[0].x) and min(density) < 1):
            return [self.keep_rule(i, taus[i], density[i]) for i in range(self.count)]
        from evomerge.kernel import triton_merge

        numel = self.inputs.base.numel()
        ks = [sparsify.magnitude_keep_count(d, numel) for d in density]
        tables = [
            self.magnitude_table(i) if self.keeps_tables() and ks[i] < numel else None
            for i in range(self.count)
        ]
        return triton_merge.top_magnitudes_of(taus, ks, tables)

    def keep_rule(self, index: int, tau: TaskVector, density: float) -> KeepRule:
        """The kernel's form of sparsified_delta's mask; DARE draws hashed inline. TIES's top-k:
        a cut by a radix select (on a GPU by torch ops and a counting kernel on the device),
        which a resident tensor of MAGNITUDE_TABLE_MIN elements or more starts from its
        magnitude table; a smaller resident one on the CPU uses its ranks instead (see
        MAGNITUDE_TABLE_MIN)."""
        if self.rule is None or density >= 1:
            return KeepRule.keep_all()
        if self.rule == "random":
            return KeepRule.hash_below(
                self.inputs.field.hash_key(index), sparsify.keep_threshold(density)
            )
        k = sparsify.magnitude_keep_count(density, self.inputs.base.numel())
        tabled = self.keeps_tables()
        if _on_gpu(tau.x):  # tau resident on the GPU, or staged there from the host
            from evomerge.kernel import triton_merge

            table = self.magnitude_table(index) if tabled else None
            return triton_merge.top_magnitudes(tau, k, table)
        if self.resident and not tabled:
            return KeepRule.key_below(self.inputs.magnitude_ranks(index), k)
        if self.resident:
            return cpu.top_magnitudes(tau, k, self.magnitude_table(index))
        return cpu.top_magnitudes(tau, k)

    def keeps_tables(self) -> bool:
        """Whether TIES's top-k starts from kept magnitude tables: a resident tensor of
        MAGNITUDE_TABLE_MIN elements or more."""
        return self.resident and self.inputs.base.numel() >= MAGNITUDE_TABLE_MIN

    def magnitude_table(self, index: int) -> torch.Tensor:
        """cpu.magnitude_table of task vector `index`, on the host (a GPU's made there): built
        on first use and kept."""
        if index not in self._magnitude_tables:
            delta = self.inputs.delta(index)
            if delta.device.type == "cpu" and cpu.fits([delta]):
                table = cpu.magnitude_table(delta)
            else:
                from evomerge.kernel import triton_merge

                table = triton_merge.magnitude_table(delta).cpu()
            self._magnitude_tables[index] = table
        return self._magnitude_tables[index]

    def l1_norms(
        self, taus: list, rules: list, rescaled: list[int]
    ) -> dict[int, tuple[float, float]]:
        """{i: (kept, all)}: the L1 norms of task vector i over what rules[i] keeps and over
        every element, from exact fixed-point sums as sparsify.l1_rescale computes them. DARE
        masks of a resident tensor read them from its draw table; the rest take one pass over
        all of them together, whose DARE rules then become the stored bits of what they kept
        (rules is updated)."""
        shifts = {i: self.l1_shift(i) for i in rescaled}
        sums = {}
        for i in rescaled:
            if (
                self.keeps_draw_tables
                and rules[i].mode == KeepRule.HASH_BELOW
                and self.inputs.base.numel() >= DRAW_TABLE_MIN
            ):
                table = self.draw_l1_table(i)
                sums[i] = int(table[rules[i].threshold]), int(table[-1])
        scanned = [i for i in rescaled if i not in sums]
        if scanned:
            scales = [2.0 ** shifts[i] for i in scanned]
            found, after = self._abs_sums(
                [taus[i] for i in scanned], [rules[i] for i in scanned], scales
            )
            for i, pair, rule in zip(scanned, found, after):
                sums[i], rules[i] = pair, rule
        return {
            i: (kept * 2.0 ** -shifts[i], every * 2.0 ** -shifts[i])
            for i, (kept, every) in sums.items()
        }

    def _abs_sums(self, taus: list, rules: list, scales: list[float]):
        if _on_gpu(taus[0].x):  # the GPU hashes again in the merge pass: compute is cheap there
            from evomerge.kernel import triton_merge

            return triton_merge.abs_sums(taus, rules, scales), rules
        return cpu.abs_sums(taus, rules, scales)

    def l1_shift(self, index: int) -> int:
        """The fixed-point scale (a power of two) of the exact L1 sums of task vector `index`."""
        return sparsify.fixed_point_shift(self.inputs.base.numel(), self.inputs.tau_bound(index))

    def draw_l1_table(self, index: int) -> torch.Tensor:
        """sparsify.draw_l1_table of task vector `index`, on the CPU (a number read per merge);
        built on first use and kept."""
        if index not in self._draw_tables:
            delta, shift, field = self.inputs.delta(index), self.l1_shift(index), self.inputs.field
            if cpu.fits([delta]):
                table = cpu.draw_l1_table(delta, field.hash_key(index), 2.0**shift)
            else:
                table = sparsify.draw_l1_table(delta, field, index, shift).cpu()
            self._draw_tables[index] = table
        return self._draw_tables[index]

    def min_magnitude(self, index: int) -> float:
        """min |x| over the nonzero elements of task vector `index` (index `count`: the base
        itself), Inf when there are none; found on first use and kept."""
        if index not in self._smallest:
            tensor = self.inputs.delta(index) if index < self.count else self.inputs.base
            self._smallest[index] = cpu.min_magnitude(tensor)
        return self._smallest[index]

    def subnormal_free(self, rescale: torch.Tensor, weights: torch.Tensor) -> bool:
        """Whether no value this merge computes can be subnormal, which bfloat16's fast path on
        CPUs with AVX512_BF16 needs (its rounding instruction reads subnormals as zero). Asked
        only where the answer is worth a pass per input: resident bfloat16 tensors.

        If every nonzero |tau_i| * min(1, s_i) * min(1, |w_i|) (w_i not 0) and every nonzero
        |theta_base| is at least 2^-99, every weighted term is 0 or at least 2^-100 in magnitude
        (the roundings on the way cost less than a factor 2), so a multiple of 2^-107 as a
        bfloat16 number; so is every sum of such terms, and the base plus one: none of them is
        nonzero below 2^-107, far from the subnormals (below 2^-126)."""
        base = self.inputs.base
        if not (self.resident and base.dtype == torch.bfloat16 and base.device.type == "cpu"):
            return False
        if self.min_magnitude(self.count) < NORMAL_FLOOR:
            return False
        for i, (scale, weight) in enumerate(
            zip(rescale.float().tolist(), weights.float().tolist())
        ):
            if (
                weight != 0
                and self.min_magnitude(i) * min(1.0, abs(scale)) * min(1.0, abs(weight))
                < NORMAL_FLOOR
            ):
                return False
        return True


# --- the host tier: inputs in host memory, staged on the device per merge ----------------------
STAGE_ALIGN = 256  # bytes: each operand's place in the staging buffer starts at a multiple


def _aligned(nbytes: int) -> int:
    return -(-nbytes // STAGE_ALIGN) * STAGE_ALIGN


class Staging:
    """The host tier's one buffer on `device`, allocated once for the run, into which each
    streamed tensor's operands are copied before its merge (`FusedTensor.host_operands`).

    On the CPU it holds the largest tensor's operands, and each merge copies into it and then
    merges. On a GPU it holds the largest two consecutive tensors': tensor i's operands go at
    its start for even i and at its end for odd i, so that the copy of tensor i + 1 (on a side
    stream, from pinned host memory) runs while tensor i merges, and never where i reads; a
    copy waits for the merges already queued, which frees the place it writes. `pairs` lays
    a CPU's buffer out as a GPU's (its copies then still run in turn: tests use it)."""

    def __init__(
        self, device: str | torch.device, tensors: list[FusedTensor], *, pairs: bool | None = None
    ):
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.pairs = self.gpu if pairs is None else pairs
        if self.gpu:
            for tensor in tensors:
                _pin(tensor)
        sizes = [sum(_aligned(t.nbytes) for t in tensor.host_operands()) for tensor in tensors]
        self.nbytes = staging_bytes(sizes, pairs=self.pairs)
        self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self.copies = torch.cuda.Stream(self.device) if self.gpu else None
        self.ready: set[Stage] = set()  # stages whose copies are in the buffer and not yet read
        self.moved = 0  # bytes copied into the buffer so far (benchmarks read it)
        for index, (tensor, size) in enumerate(zip(tensors, sizes)):
            at = self.nbytes - size if self.pairs and index % 2 else 0
            tensor.stage = Stage(self, tensor, at)


def staging_bytes(sizes: list[int], *, pairs: bool) -> int:
    """The staging buffer for tensors whose operands take `sizes` bytes (aligned) in order:
    the largest, or with `pairs` (a GPU) the largest two consecutive together."""
    if not sizes:
        return 0
    largest = max(sizes)
    if pairs and len(sizes) > 1:
        largest = max(largest, max(a + b for a, b in zip(sizes, sizes[1:])))
    return largest


def _pin(tensor: FusedTensor) -> None:
    """Move a streamed tensor's host operands into pinned memory (copies from pageable memory
    to a GPU are staged by the driver and cannot overlap compute)."""
    inputs = tensor.inputs
    inputs.base = inputs.base.pin_memory()
    for i in range(tensor.count):
        # MergeInputs keeps its task vectors in its memo: the pinned copy replaces the pageable
        inputs._memo["delta", i] = inputs.delta(i).pin_memory()


class Stage:
    """One streamed tensor's place in the `Staging` buffer: views made once (no per-merge
    allocation), filled by `fetch`, read by `operands`."""

    def __init__(self, staging: Staging, tensor: FusedTensor, at: int):
        self.staging, self.host = staging, tensor.host_operands()
        self.start, self.views = at, []
        for source in self.host:
            piece = staging.buffer[at : at + source.nbytes]
            self.views.append(piece.view(source.dtype).view(source.shape))
            at += _aligned(source.nbytes)
        self.end = at
        self.count = tensor.count
        self.copied = torch.cuda.Event() if staging.gpu else None

    def fetch(self) -> None:
        """Copy the host operands into the buffer, unless they are there already (prefetched)
        and unread; on a GPU asynchronously, on the side stream."""
        staging = self.staging
        if self in staging.ready:
            return
        for other in [s for s in staging.ready if s.start < self.end and self.start < s.end]:
            staging.ready.discard(other)  # overwritten: fetched again when it merges
        if staging.gpu:
            staging.copies.wait_stream(torch.cuda.current_stream(staging.device))
            with torch.cuda.stream(staging.copies):
                for view, source in zip(self.views, self.host):
                    view.copy_(source, non_blocking=True)
            self.copied.record(staging.copies)
        else:
            for view, source in zip(self.views, self.host):
                view.copy_(source)
        staging.moved += sum(source.nbytes for source in self.host)
        staging.ready.add(self)

    def prefetch(self) -> None:
        """Start the copy now where it can overlap another tensor's merge (a GPU)."""
        if self.staging.pairs:
            self.fetch()

    def operands(self) -> list[torch.Tensor]:
        """The staged base and task vectors, once copied (fetched now if they are not there)."""
        self.fetch()
        if self.copied is not None:
            torch.cuda.current_stream(self.staging.device).wait_event(self.copied)
        self.staging.ready.discard(self)  # read once: a later merge fetches again
        return self.views[: 1 + self.count]


# --- the GPU: checked against the CPU before first use ----------------------------------------
@cache
def gpu_ready(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel runs on this GPU and gives the CPU's bits for this dtype: it
    is checked once per process against the torch code on small random inputs, every rule
    included; on any failure the torch code runs instead, with a warning."""
    if cpu.disabled():
        return False
    try:
        mismatch = self_check(device, dtype)
    except Exception as exc:  # no triton, a compile error, a driver problem
        LOG.warning(
            "the Triton merge kernel is unavailable on %s (%s); using torch ops", device, exc
        )
        return False
    if mismatch:
        LOG.warning(
            "the Triton merge kernel differs from the CPU on %s for %s (%s); using torch ops",
            device,
            dtype,
            mismatch,
        )
    return not mismatch


def self_check(device: torch.device, dtype: torch.dtype) -> str:
    """'' when the fused kernel on `device` gives the torch code's bits (and its finiteness)
    on small random inputs, else the merge that differed: DARE-TIES with its L1 rescale and
    TIES with normalisation (both one-shot and resident), and task arithmetic with lambda;
    resident TIES also on a tensor large enough to keep magnitude tables, so that a search's
    per-trial cut from its tables is checked too."""
    small = _check_inputs(3 * 1024 + 17, dtype)  # a few kernel blocks and a ragged end
    large = _check_inputs(MAGNITUDE_TABLE_MIN + 1024 + 17, dtype)
    cases = {  # the rules of each method are its own (`MergeMethod.task_vectors`)
        "dare_ties": dict(density=[0.3, 0.5, 1.0], rescale=True, normalize=False, lambda_=1.0),
        "ties": dict(density=[0.2, 0.5, 0.7], rescale=False, normalize=True, lambda_=1.0),
        "task_arithmetic": dict(density=[1.0] * 3, rescale=False, normalize=False, lambda_=0.8),
    }
    weights = ([0.6, -0.3, 0.9], [-0.6, -0.3, -0.9])
    checks = [(small, *case) for case in itertools.product(cases, (False, True), weights)]
    checks += [(large, "ties", True, weight) for weight in weights]
    for (base, models), name, resident, weight in checks:
        parameters = cases[name]
        rules = get_method(name).task_vectors
        field = UniformField(7, name)
        expected = task_vector_merge(
            MergeInputs(models, base, name, field),
            weight=weight,
            rule=rules.sparsify,
            consensus=rules.consensus,
            **parameters,
        )
        inputs = MergeInputs([m.to(device) for m in models], base.to(device), name, field)
        got, finite = FusedTensor(
            inputs, rule=rules.sparsify, consensus=rules.consensus, resident=resident
        ).merge(weight=weight, **parameters)
        got = got.cpu()
        bits = torch.int16 if got.itemsize == 2 else torch.int32
        if not torch.equal(got.view(bits), expected.view(bits)) or finite != bool(
            torch.isfinite(expected).all()
        ):
            return (
                f"{name}, {'resident' if resident else 'one-shot'}, {base.numel()} elements, "
                f"weights {weight}"
            )
    return ""


def _check_inputs(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`self_check`'s base and three models of `numel` elements (seeded, the same every run)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(numel, generator=generator).to(dtype)
    models = [
        (base.float() + 0.02 * torch.randn(numel, generator=generator)).to(dtype) for _ in range(3)
    ]
    for x in (base, *models):
        x[:8] = -0.0  # with all weights negative, sums of -0s: +0, as torch sums
    return base, models
