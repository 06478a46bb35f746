"""The dev examples as teacher-forced sequences: context, then the answer the metric wants.

A learned merge needs a loss it can differentiate, and the scores lm-eval computes are not
differentiable. The nearest thing is the log-likelihood of each example's answer given its
context, with the model fed the answer's own tokens (teacher forcing):

    loss(example) = -(1/n) * sum_{k<n} log p(answer_k | context, answer_<k)

For loglikelihood tasks the answer is lm-eval's continuation, tokenised as lm-eval tokenises it
(`PreparedRequests.tokens`); for multiple-choice tasks the gold choice; for generate-until tasks
the target text followed by the first stop string (what greedy decoding must write for an
exact match). The same forward pass also says whether every answer token is the argmax: for
`acc` (greedy match) and greedy `exact_match` that is the metric itself, which is what
early stopping reads on the fold of dev kept apart.

Without answers (`prompt_examples`: the context alone, `n_answer` 0), what a batch gives is the
next-token distribution where the answer would start, whose entropy an unsupervised objective
reads (AdaMerging's, `search.refine: {objective: entropy}`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from evomerge.errors import UserError


@dataclass(frozen=True)
class Example:
    """One dev document as a teacher-forced sequence: `tokens` = context + answer."""

    task: str
    doc: int
    tokens: tuple[int, ...]
    n_answer: int


@dataclass
class TeacherBatch:
    """Right-padded examples and where each answer token is predicted."""

    inputs: torch.Tensor  # (B, T) token ids, right-padded with 0
    last: torch.Tensor  # (B,) per example: the position of its context's last token
    rows: torch.Tensor  # (N,) per answer token: its row
    at: torch.Tensor  # (N,) the position whose logits predict it
    targets: torch.Tensor  # (N,) the answer token
    owner: torch.Tensor  # (N,) its example's index in `examples`
    examples: list[Example]

    def scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example (B,): the answer's mean token NLL, and whether every answer token is
        the argmax (greedy match)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        picked = logprobs[self.rows, self.at, self.targets]  # (N,)
        greedy = (logits[self.rows, self.at].argmax(dim=-1) == self.targets).float()  # (N,)
        n = len(self.examples)
        lengths = torch.tensor([e.n_answer for e in self.examples], dtype=picked.dtype)
        nll = torch.zeros(n, dtype=picked.dtype).index_add(0, self.owner, -picked) / lengths
        hits = torch.zeros(n).index_add(0, self.owner, greedy)
        return nll, hits == lengths

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Per example (B,): the entropy (nats) of the next-token distribution at the
        context's last position, where the answer starts; `logits` (B, T, V)."""
        at = logits[torch.arange(len(self.examples)), self.last].float()  # (B, V)
        logprobs = torch.log_softmax(at, dim=-1)
        return -(logprobs.exp() * logprobs).sum(dim=-1)


REFINEMENT = (
    "refinement by gradient",
    "set search.refine: {objective: entropy} (no answers needed) or null for this task",
)
"""Who needs the examples and what the user can do without them, for the one-sentence refusals."""


def teacher_forced_examples(evaluator, needed_by: tuple[str, str] = REFINEMENT) -> list[Example]:
    """Every document of the evaluator's split (hf backend) as a teacher-forced example;
    a UserError naming a task whose documents have no answer to learn from (`needed_by`: who
    wants them, and the way out, for its sentence)."""
    prepared = evaluator.prepared
    if not hasattr(prepared, "tokens"):
        raise UserError(f"{needed_by[0]} needs fitness.backend: hf")
    out = []
    for name, by_doc in prepared.docs.items():
        task = prepared.tasks[name]
        for doc, ids in sorted(by_doc.items()):
            context, answer = _answer_tokens(prepared, task, name, ids, needed_by)
            out.append(Example(name, doc, tuple(context + answer), len(answer)))
    return out


def _answer_tokens(
    prepared, task, name: str, ids: list[int], needed_by: tuple[str, str]
) -> tuple[list[int], list[int]]:
    first = prepared.instances[ids[0]]
    if first.request_type == "loglikelihood":
        gold = 0 if len(ids) == 1 else _gold_choice(task, first.doc, name, needed_by)
        context, answer = map(list, prepared.tokens[ids[gold]])
        if not answer:  # an empty continuation: nothing to be likely
            raise _no_answers(name, needed_by)
        return context, answer
    context, kwargs = first.args
    target = task.doc_to_target(first.doc)
    if isinstance(target, list):
        target = target[0] if target else None
    if target is None or str(target) == "":
        raise _no_answers(name, needed_by)
    until = (kwargs or {}).get("until") or []
    stop = until[0] if isinstance(until, list) and until else (until or "")
    context_tokens, answer = prepared.lm._encode_pair(context, str(target) + stop)
    return list(context_tokens), list(answer)


def prompt_examples(evaluator) -> list[Example]:
    """Every document of the evaluator's split (hf backend) as its context alone (`n_answer`
    0), as the model reads it before answering: a loglikelihood request's context tokens, a
    generate-until prompt as generation encodes it. No target is read."""
    prepared = evaluator.prepared
    if not hasattr(prepared, "tokens"):
        raise UserError(f"{REFINEMENT[0]} needs fitness.backend: hf")
    out = []
    for name, by_doc in prepared.docs.items():
        for doc, ids in sorted(by_doc.items()):
            first = prepared.instances[ids[0]]
            if first.request_type == "loglikelihood":
                context = list(prepared.tokens[ids[0]][0])
            else:
                context = list(prepared.lm.tok_encode(first.args[0]))
            out.append(Example(name, doc, tuple(context), 0))
    return out


def _no_answers(name: str, needed_by: tuple[str, str]) -> UserError:
    return UserError(
        f"task {name!r} has no target answers, and {needed_by[0]} learns from them; {needed_by[1]}"
    )


def _gold_choice(task, doc, name: str, needed_by: tuple[str, str]) -> int:
    gold = task.doc_to_target(doc)
    if not isinstance(gold, int):
        raise UserError(
            f"task {name!r}: {needed_by[0]} needs one gold choice per document; {needed_by[1]}"
        )
    return gold


def split_examples(
    examples: list[Example], *, held_out: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) folds, `held_out` of each task's documents kept apart (seeded)."""
    train, kept = [], []
    for task in dict.fromkeys(e.task for e in examples):
        mine = [e for e in examples if e.task == task]
        random.Random(f"{seed}:{task}").shuffle(mine)
        cut = max(1, round(held_out * len(mine)))
        kept += mine[:cut]
        train += mine[cut:]
    return train, kept


def batches(examples: list[Example], size: int) -> list[TeacherBatch]:
    """Examples cut into batches of `size` in the order given."""
    return [make_batch(examples[i : i + size]) for i in range(0, len(examples), size)]


def make_batch(examples: list[Example]) -> TeacherBatch:
    """One right-padded batch; the input is every token but the last (every token of an
    example without an answer: its last position predicts where the answer would start)."""
    fed = [e.tokens[:-1] if e.n_answer else e.tokens for e in examples]
    width = max(len(tokens) for tokens in fed)
    inputs = torch.zeros(len(examples), width, dtype=torch.long)
    rows, at, targets, owner = [], [], [], []
    for row, (e, tokens) in enumerate(zip(examples, fed)):
        inputs[row, : len(tokens)] = torch.tensor(tokens)
        first = len(e.tokens) - e.n_answer  # the first answer token's index in `tokens`
        for k in range(e.n_answer):
            rows.append(row)
            at.append(first + k - 1)  # logits at position p predict token p + 1
            targets.append(e.tokens[first + k])
            owner.append(row)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    last = as_long([len(e.tokens) - e.n_answer - 1 for e in examples])
    return TeacherBatch(
        inputs, last, as_long(rows), as_long(at), as_long(targets), as_long(owner), examples
    )


def fold_scores(
    forward: Callable[[torch.Tensor], torch.Tensor], folds: list[TeacherBatch]
) -> tuple[dict[str, float], float]:
    """Per task, the greedy-match share over `folds`, and the mean answer NLL; `forward`
    maps (B, T) token ids to (B, T, V) logits."""
    hits: dict[str, list[float]] = {}
    nlls = []
    with torch.no_grad():
        for batch in folds:
            nll, greedy = batch.scores(forward(batch.inputs))
            nlls += nll.tolist()
            for e, g in zip(batch.examples, greedy.tolist()):
                hits.setdefault(e.task, []).append(float(g))
    return {t: sum(v) / len(v) for t, v in hits.items()}, sum(nlls) / max(len(nlls), 1)
