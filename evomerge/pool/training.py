"""Training the pools' tiny models: tokenizer, model shape, batches, the optimiser loop.

Deterministic (fixed seeds, one torch thread) and offline. `bench/ceiling.py` reuses these
functions to train its multi-task model the same way the specialists are trained.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from typing import TYPE_CHECKING

from evomerge.pool.skills import VOCAB_CHARS, Skill
from evomerge.pool.tasks import STOP

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

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
    replay: float
    """Share of a specialist's training examples drawn from the base's mix of all skills: it
    keeps the specialist near the base (in one basin with its siblings), so merges keep skills."""
    warmup: int = 20


# head_dim = hidden / heads = 64 in both sizes: vLLM's CPU attention needs head_dim >= 64.
SIZES: dict[str, PoolSize] = {
    "full": PoolSize(
        hidden=256,
        layers=3,
        heads=4,
        kv_heads=4,
        intermediate=512,
        batch=32,
        base_steps=400,
        base_lr=1e-3,
        spec_steps=300,
        spec_lr=5e-4,
        replay=0.35,
    ),
    "small": PoolSize(
        hidden=64,
        layers=2,
        heads=1,
        kv_heads=1,
        intermediate=128,
        batch=32,
        base_steps=300,
        base_lr=3e-3,
        spec_steps=200,
        spec_lr=3e-3,
        replay=0.0,
    ),
}

# Per pool and size, what its build changes in SIZES. Both full pools use the wide model
# (hidden 256, 4 heads; until 2026-12-06 the demo used hidden 128 with 2 heads): at that width a
# merge keeps 70-97% of each specialist's skill against 51-86% on the narrow one, as merging at
# scale does (bench/pool_variants.py, in docs/BENCHMARKS.md). demo2's base trains 500 steps:
# by then its `sub` specialist beats the uniform merge and a weighting of the three beats `sub`.
# The small model needs 400 base steps and 400 specialist steps for specialists that beat the
# base (sub 0.073 against 0.047 on dev: a smoke-sized pool, not one worth merging).
SCHEDULES: dict[str, dict[str, dict[str, float]]] = {
    "demo2": {"full": {"base_steps": 500}, "small": {"base_steps": 400, "spec_steps": 400}},
}


def pool_size(pool: str, size: str) -> PoolSize:
    """The shape and schedule of `pool` built at `size`."""
    return dataclasses.replace(SIZES[size], **SCHEDULES.get(pool, {}).get(size, {}))


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


def make_model(size: PoolSize, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
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


class Batches:
    """An endless, seeded stream of training batches that never contains a held-out prompt.

    Each example is drawn from `focus` (one skill, or a mix), except a `replay` share drawn
    from `mix` (the base's mix of all skills).
    """

    def __init__(
        self,
        focus: list[Skill],
        tokenizer: PreTrainedTokenizerFast,
        *,
        held_out: set[str],
        seed: int,
        mix: list[Skill] = (),
        replay: float = 0.0,
    ):
        self.focus, self.mix, self.replay = list(focus), list(mix), replay
        self.rng = random.Random(seed)
        self.vocab = tokenizer.get_vocab()
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id
        self.held_out = held_out

    def example(self) -> tuple[str, str]:
        """One (prompt, answer + STOP) pair; never a held-out prompt."""
        replayed = self.replay > 0 and self.rng.random() < self.replay
        skill = self.rng.choice(self.mix if replayed else self.focus)
        while True:
            prompt, answer = skill.generate(self.rng)
            if prompt not in self.held_out:
                return prompt, answer + STOP

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        rows = []
        for _ in range(batch):
            prompt, answer = self.example()
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


def train(
    model: LlamaForCausalLM,
    batches: Batches,
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
