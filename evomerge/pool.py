"""The offline demo pool: a tiny base model and one specialist per synthetic skill.

Everything here is deterministic (fixed seeds, one torch thread) and needs no network:

- a character-level tokenizer (one token per character, BOS added by the post-processor);
- a small `LlamaForCausalLM` base, pretrained on a mix of all skills;
- one specialist per skill, fine-tuned from the base on that skill alone at a lower rate;
- held-out test sets, disjoint from every training example, written as lm-eval tasks.

The pool is built so that merging has real headroom: each specialist beats the base on its
own skill, and a weighted task-arithmetic merge beats every single model on the mean of the
tasks, while a naive uniform merge does not reach that weighting (see README for figures).

Layout written by `build_pool(out_dir)`::

    out_dir/base/            HF folder (config.json, model.safetensors, tokenizer files)
    out_dir/<skill>/         one specialist per skill, same layout
    out_dir/tasks/           lm-eval task YAMLs + held-out test data (jsonl)
    out_dir/pool.json        manifest: models, skills, tasks, build settings and timings
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

MANIFEST_NAME = "pool.json"
TASK_PREFIX = "evomerge_"  # lm-eval task names: evomerge_add, evomerge_rev, evomerge_sort

# ----------------------------------------------------------------------------- the skills
# Each skill maps a seeded RNG to one (prompt, answer) pair. The answer ends in "." so that a
# greedy match of the whole answer also checks that the model knows where the answer stops.

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LENGTHS = (4, 8)  # letters per rev/sort example, inclusive
ADD_RANGES = (100, 10)  # add: a below 100 plus b below 10


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(ADD_RANGES[0]), rng.randrange(ADD_RANGES[1])
    return f"a:{a}+{b}=", f"{a + b}."


def _rev(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*WORD_LENGTHS)))
    return f"r:{s}=", f"{s[::-1]}."


def _sort(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*WORD_LENGTHS)))
    return f"s:{s}=", "".join(sorted(s)) + "."


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "rev": _rev,
    "sort": _sort,
}
SKILL_DESCRIPTIONS = {
    "add": f"add a number below {ADD_RANGES[0]} and one below {ADD_RANGES[1]}: a:37+8=45.",
    "rev": f"reverse {WORD_LENGTHS[0]}-{WORD_LENGTHS[1]} letters: r:abcd=dcba.",
    "sort": f"sort {WORD_LENGTHS[0]}-{WORD_LENGTHS[1]} letters: s:dbca=abcd.",
}

N_TEST = 150
TEST_SEED = 1234
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_CHARS = "0123456789" + LETTERS + "+=:. "


def test_set(skill: str, n: int = N_TEST) -> list[dict[str, str]]:
    """The held-out examples of one skill: distinct prompts, fixed by `TEST_SEED`."""
    rng = random.Random(f"{TEST_SEED}-{skill}")
    seen: set[str] = set()
    docs: list[dict[str, str]] = []
    while len(docs) < n:
        prompt, answer = SKILLS[skill](rng)
        if prompt not in seen:
            seen.add(prompt)
            docs.append({"prompt": prompt, "answer": answer})
    return docs


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class PoolSize:
    """Model shape and training schedule of one pool size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    batch: int
    base_steps: int
    base_lr: float
    spec_steps: int
    spec_lr: float
    warmup: int = 20


# head_dim = hidden / heads = 64 in both sizes: vLLM's CPU attention needs head_dim >= 64.
SIZES: dict[str, PoolSize] = {
    "full": PoolSize(
        hidden=128, layers=3, heads=2, kv_heads=2, intermediate=256, batch=32,
        base_steps=600, base_lr=3e-3, spec_steps=300, spec_lr=5e-4,
    ),
    "small": PoolSize(
        hidden=64, layers=2, heads=1, kv_heads=1, intermediate=128, batch=32,
        base_steps=300, base_lr=3e-3, spec_steps=200, spec_lr=3e-3,
    ),
}

# ----------------------------------------------------------------------------- tokenizer


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer; BOS is prepended by its post-processor (as lm-eval expects)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(VOCAB_CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


# ----------------------------------------------------------------------------- training


def _make_model(size: PoolSize, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class _Batches:
    """An endless, seeded stream of training batches that never contains a test prompt."""

    def __init__(self, skills: list[str], tokenizer: PreTrainedTokenizerFast, seed: int):
        self.skills = skills
        self.rng = random.Random(seed)
        self.vocab = tokenizer.get_vocab()
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id
        self.held_out = {doc["prompt"] for s in SKILLS for doc in test_set(s)}

    def _example(self) -> tuple[str, str]:
        skill = self.rng.choice(self.skills)
        while True:
            prompt, answer = SKILLS[skill](self.rng)
            if prompt not in self.held_out:
                return prompt, answer

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        rows = []
        for _ in range(batch):
            prompt, answer = self._example()
            ids = [self.bos] + [self.vocab[c] for c in prompt + answer]
            n_prompt = 1 + len(prompt)
            rows.append((ids, n_prompt))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch, width), self.pad, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, width), -100, dtype=torch.long)  # (B, T)
        mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        for i, (ids, n_prompt) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            # Loss on the answer only: prompts are random digits/letters, nothing to learn.
            labels[i, n_prompt : len(ids)] = input_ids[i, n_prompt : len(ids)]
        return input_ids, mask, labels


def _train(
    model: LlamaForCausalLM,
    batches: _Batches,
    *,
    steps: int,
    lr: float,
    batch: int,
    warmup: int,
    label: str,
) -> float:
    """AdamW with linear warmup and cosine decay to 10%; returns the final smoothed loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    smooth = float("nan")
    for step in range(steps):
        input_ids, mask, labels = batches.next(batch)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        smooth = value if math.isnan(smooth) else 0.9 * smooth + 0.1 * value
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log.info("%s step %d/%d loss %.4f", label, step + 1, steps, smooth)
    model.eval()
    return smooth


# ----------------------------------------------------------------------------- tasks


def write_tasks(task_dir: Path, n_test: int = N_TEST) -> list[str]:
    """Write one lm-eval task YAML per skill plus its held-out data; return the task names.

    `data_files` are relative to the YAML file (evomerge's evaluator resolves them so), and
    each task scores the greedy match of the answer (`acc`) and its perplexity (lower is better).
    """
    task_dir = Path(task_dir)
    (task_dir / "data").mkdir(parents=True, exist_ok=True)
    names = []
    for skill in SKILLS:
        name = TASK_PREFIX + skill
        data_rel = f"data/{skill}_test.jsonl"
        with open(task_dir / data_rel, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(doc) + "\n" for doc in test_set(skill, n_test))
        yaml_text = (
            f"# evomerge demo skill '{skill}': {SKILL_DESCRIPTIONS[skill]}\n"
            f"# Written by evomerge.pool.write_tasks; data_files are relative to this file.\n"
            f"task: {name}\n"
            f"tag: evomerge_demo\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n"
            f"  data_files:\n"
            f"    test: {data_rel}\n"
            f"test_split: test\n"
            f"output_type: loglikelihood\n"
            f'doc_to_text: "{{{{prompt}}}}"\n'
            f'doc_to_target: "{{{{answer}}}}"\n'
            f'target_delimiter: ""\n'
            f"metric_list:\n"
            f"  - metric: acc\n"
            f"    aggregation: mean\n"
            f"    higher_is_better: true\n"
            f"  - metric: perplexity\n"
            f"    aggregation: perplexity\n"
            f"    higher_is_better: false\n"
            f"metadata:\n"
            f"  version: 1.0\n"
        )
        (task_dir / f"{name}.yaml").write_text(yaml_text, encoding="utf-8")
        names.append(name)
    return names


def repo_task_dir() -> Path | None:
    """The `eval_tasks/` folder of a source checkout, if this package runs from one."""
    candidate = Path(__file__).resolve().parents[1] / "eval_tasks"
    return candidate if candidate.is_dir() else None


# ----------------------------------------------------------------------------- the build


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def build_pool(out_dir: str | Path, *, size: str = "full", force: bool = False) -> dict[str, Any]:
    """Build the demo pool into `out_dir`; return the manifest that is also written there.

    The folder is assembled under a temporary sibling and renamed into place at the end, so a
    failed or interrupted build leaves nothing half-written.
    """
    if size not in SIZES:
        raise UserError(f"unknown pool size {size!r}; choose one of {', '.join(SIZES)}.")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} already exists and is not empty; pass --force to replace it.")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder.")

    import torch

    spec = SIZES[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster than two
    started = time.perf_counter()
    tmp = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer = make_tokenizer()
        task_names = write_tasks(tmp / "tasks")
        skills = list(SKILLS)
        timings: dict[str, float] = {}
        losses: dict[str, float] = {}

        t0 = time.perf_counter()
        base = _make_model(spec, tokenizer, seed=0)
        losses["base"] = _train(
            base, _Batches(skills, tokenizer, seed=1), steps=spec.base_steps, lr=spec.base_lr,
            batch=spec.batch, warmup=spec.warmup, label="base",
        )
        _save(base, tokenizer, tmp / "base")
        timings["base"] = time.perf_counter() - t0
        base_state = {k: v.clone() for k, v in base.state_dict().items()}

        for i, skill in enumerate(skills):
            t0 = time.perf_counter()
            base.load_state_dict(base_state)
            torch.manual_seed(100 + i)
            losses[skill] = _train(
                base, _Batches([skill], tokenizer, seed=10 + i), steps=spec.spec_steps,
                lr=spec.spec_lr, batch=spec.batch, warmup=spec.warmup, label=skill,
            )
            _save(base, tokenizer, tmp / skill)
            timings[skill] = time.perf_counter() - t0

        manifest = {
            "format": "evomerge-pool/1",
            "size": size,
            "base": "base",
            "models": {"base": "base", **{s: s for s in skills}},
            "skills": {
                s: {"model": s, "task": TASK_PREFIX + s, "description": SKILL_DESCRIPTIONS[s]}
                for s in skills
            },
            "task_path": "tasks",
            "tasks": task_names,
            "settings": dataclasses.asdict(spec),
            "final_loss": {k: round(v, 5) for k, v in losses.items()},
            "seconds": {k: round(v, 2) for k, v in timings.items()},
        }
        manifest["seconds"]["total"] = round(time.perf_counter() - started, 2)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return manifest


def load_manifest(pool_dir: str | Path) -> dict[str, Any]:
    """Read `pool.json` of a built pool, with model and task paths made absolute."""
    pool_dir = Path(pool_dir)
    path = pool_dir / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{pool_dir} is not a demo pool (no {MANIFEST_NAME}); build one with "
                        "`evomerge pool demo DIR`.")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["models"] = {k: str((pool_dir / v).resolve()) for k, v in manifest["models"].items()}
    manifest["task_path"] = str((pool_dir / manifest["task_path"]).resolve())
    return manifest
