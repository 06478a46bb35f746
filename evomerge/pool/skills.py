"""The synthetic skills of the offline pools, and which pool has which.

A skill maps a seeded RNG to one (prompt, answer) pair. Every prompt starts with the skill's
own letter and a colon, so one model can learn several skills at once. In training the answer
is followed by "." so that the model also learns where an answer stops: a loglikelihood task
scores the greedy match of "answer." and a generate-until task generates until ".".
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Literal

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
WORD_LENGTHS = (4, 8)  # letters per rev/sort example, inclusive
ADD_RANGES = (100, 10)  # add: a below 100 plus b below 10
SHIFT = 3  # shift: each letter moves 3 places on (a Caesar cipher)
# Longer words than rev/sort: the wide model (SIZES["full"]) learns a 3-5 letter cipher from
# the base's mix alone (0.95-0.99 exact match), which leaves its specialist nothing to add; over
# 6-10 letters the base reaches 0.76 and the specialist 1.00 (demo2 test split, 500 base steps).
SHIFT_LENGTHS = (6, 10)
SUB_RANGES = (10, 100, 10)  # sub: a from 10 to 99 minus b below 10
RUNS = (3, 6)  # dedup: runs of one letter per example, inclusive
RUN_LENGTH = 3  # dedup: letters per run, at most
DEDUP_LETTERS = LETTERS[:8]  # a small alphabet, so neighbouring runs often look alike


@dataclasses.dataclass(frozen=True)
class Skill:
    """One synthetic skill and how its lm-eval task scores it."""

    name: str
    generate: Callable[[random.Random], tuple[str, str]]
    description: str
    output_type: Literal["loglikelihood", "generate_until"] = "loglikelihood"

    @property
    def metric(self) -> str:
        """The metric a search should use for this skill's task."""
        return "exact_match" if self.output_type == "generate_until" else "acc"


def _word(rng: random.Random, lengths: tuple[int, int] = WORD_LENGTHS) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(*lengths)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(ADD_RANGES[0]), rng.randrange(ADD_RANGES[1])
    return f"a:{a}+{b}=", f"{a + b}"


def _rev(rng: random.Random) -> tuple[str, str]:
    s = _word(rng)
    return f"r:{s}=", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _word(rng)
    return f"s:{s}=", "".join(sorted(s))


def _shift(rng: random.Random) -> tuple[str, str]:
    s = _word(rng, SHIFT_LENGTHS)
    return f"c:{s}=", "".join(LETTERS[(LETTERS.index(c) + SHIFT) % len(LETTERS)] for c in s)


def _sub(rng: random.Random) -> tuple[str, str]:
    # Written "m:37 8=" (no "-" in the vocabulary, which both pools share).
    a, b = rng.randrange(SUB_RANGES[0], SUB_RANGES[1]), rng.randrange(SUB_RANGES[2])
    return f"m:{a} {b}=", f"{a - b}"


def _dedup(rng: random.Random) -> tuple[str, str]:
    runs = [rng.choice(DEDUP_LETTERS)]
    for _ in range(rng.randint(*RUNS) - 1):
        runs.append(rng.choice(DEDUP_LETTERS.replace(runs[-1], "")))
    text = "".join(c * rng.randint(1, RUN_LENGTH) for c in runs)
    return f"d:{text}=", "".join(runs)


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill(
            "add",
            _add,
            f"add a number below {ADD_RANGES[0]} and one below {ADD_RANGES[1]}: a:37+8=45.",
        ),
        Skill("rev", _rev, f"reverse {WORD_LENGTHS[0]}-{WORD_LENGTHS[1]} letters: r:abcd=dcba."),
        Skill("sort", _sort, f"sort {WORD_LENGTHS[0]}-{WORD_LENGTHS[1]} letters: s:dbca=abcd."),
        Skill(
            "shift",
            _shift,
            f"move {SHIFT_LENGTHS[0]}-{SHIFT_LENGTHS[1]} letters "
            f"{SHIFT} places on (generated until '.'): c:abcdyz=defgbc.",
            "generate_until",
        ),
        Skill(
            "sub",
            _sub,
            f"subtract a number below {SUB_RANGES[2]} from one of "
            f"{SUB_RANGES[0]}-{SUB_RANGES[1] - 1}: m:37 8=29.",
        ),
        Skill(
            "dedup",
            _dedup,
            f"collapse runs of letters of {DEDUP_LETTERS[0]}-{DEDUP_LETTERS[-1]}: d:aabccc=abc.",
        ),
    )
}
"""Every skill, by name."""

# demo and demo2 are the pools the search's defaults and the pools' schedule were chosen on;
# demo3 is held out from both choices (built with the default schedule, searched only to
# report how the chosen default does on a pool it was not chosen on).
POOLS: dict[str, dict[str, Skill]] = {
    name: {skill: SKILLS[skill] for skill in skills}
    for name, skills in (
        ("demo", ("add", "rev", "sort")),
        ("demo2", ("shift", "sub", "dedup")),
        ("demo3", ("add", "dedup", "shift")),
    )
}
"""Pool name -> its skills, in task order."""

VOCAB_CHARS = DIGITS + LETTERS + "+=:. "
"""Every character any skill writes (the tokenizer's vocabulary, shared by all pools)."""
