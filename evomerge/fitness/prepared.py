"""lm-eval requests built once per run; each call runs only the model and the metrics.

The requests of a run depend on the tasks and the tokenizer, never on the candidate. So at
construction, lm-eval's own task API builds every instance (`Task.build_all_requests`) and the
run's lm-eval LM tokenises each loglikelihood request (its `_encode_pair` and BOS rules, as
`TemplateLM.loglikelihood` does). A call (`PreparedRequests.run`) then asks the backend for the
responses of the wanted documents' instances (`respond`, the one step that differs per
backend), and hands them to lm-eval's own filters (`Task.apply_filters`) and
`Task.process_results`; `Task.aggregation` combines the per-document values.

"hf" (`HFPreparedRequests`): each set of documents that gets scored is also laid out once, as
lm-eval's HFLM would batch it:

- loglikelihood: requests sharing context + continuation[:-1] are computed once (HFLM's
  `logits_cache`), sorted longest first, cut into `batch_size` chunks, right-padded with 0.
- generate_until: grouped by generation kwargs, sorted longest context first, cut into chunks,
  left-padded by `HFLM.tok_batch_encode`.

The same batches in the same order give the same forward passes bit for bit, so scores equal
`lm_eval.evaluator.evaluate`'s (tests/test_prepared.py checks every bundled task). A call runs
the model on the prepared batches and reads log-probabilities and greedy flags with a few
batched tensor ops.

Generation is greedy (`model.generate`) from the prepared contexts; a row stops at the first
token whose text holds a stop string (or at EOS), and the decoded text is cut at the first
stop string as HFLM does. HFLM stops a whole batch only when every row has a stop string and
otherwise keeps generating after it; what comes after the first stop string is cut either way.

"vllm": see `evomerge.fitness.vllm_backend.VLLMPreparedRequests`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import UserError

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM

LOG = logging.getLogger(__name__)
LAYOUTS_KEPT = 8  # the full set, the subset and a few multi-fidelity slices
Values = dict[tuple[str, str], list[Any]]
"""Per (metric, filter) of a task: the per-document values lm-eval's `process_results` gave."""


@dataclasses.dataclass
class _LoglikelihoodBatch:
    """One forward pass: right-padded inputs and where each request's tokens sit in its output."""

    inputs: torch.Tensor  # (B, T) token ids, right-padded with 0 as HFLM pads
    rows: torch.Tensor  # (N,) per continuation token: its row in the batch
    logprob_at: torch.Tensor  # (N,) the position whose log-probability HFLM sums
    greedy_at: torch.Tensor  # (N,) the position whose argmax HFLM compares
    targets: torch.Tensor  # (N,) the continuation token


@dataclasses.dataclass
class _LoglikelihoodLayout:
    batches: list[_LoglikelihoodBatch]
    by_length: list[tuple[torch.Tensor, torch.Tensor]]
    """Per continuation length L: (requests (n,), their tokens' places in the flat
    concatenation of all batches (n, L)) — one batched sum per length, like HFLM's per-row sum."""
    requests: list[int]  # instance ids, in the order the layout answers them


@dataclasses.dataclass
class _GenerateBatch:
    inputs: torch.Tensor  # (B, T) left-padded contexts
    attention_mask: torch.Tensor  # (B, T)
    max_length: int  # T + max_gen_toks, as HFLM asks generate
    until: list[str]
    stop_tokens: torch.Tensor  # (V,) bool: tokens whose text holds a stop string, or EOS
    kwargs: dict[str, Any]
    requests: list[int]  # instance ids, one per row


@dataclasses.dataclass
class _Layout:
    loglikelihood: _LoglikelihoodLayout | None
    generate: list[_GenerateBatch]


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How prompts are written: lm-eval's `evaluate(apply_chat_template=...,
    system_instruction=..., fewshot_as_multiturn=...)`, from a fitness config."""

    apply_chat_template: bool = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False

    @classmethod
    def of(cls, config: Any) -> PromptFormat:
        """The prompt format a `FitnessConfig` asks for."""
        return cls(
            apply_chat_template=bool(getattr(config, "apply_chat_template", False)),
            system_instruction=getattr(config, "system_instruction", None),
            fewshot_as_multiturn=bool(getattr(config, "fewshot_as_multiturn", False)),
        )

    def request_kwargs(self, lm: TemplateLM) -> dict[str, Any]:
        """The arguments lm-eval's `evaluate` gives `Task.build_all_requests` for this format."""
        chat = self.apply_chat_template
        if chat and not getattr(getattr(lm, "tokenizer", None), "chat_template", None):
            raise UserError(
                "fitness.apply_chat_template is true but the model's tokenizer has no chat "
                "template; set it to false (or give the model a chat template)."
            )
        return {
            "system_instruction": self.system_instruction,
            "apply_chat_template": chat,
            "fewshot_as_multiturn": self.fewshot_as_multiturn,
            # one function for every backend, over the LM's own tokenizer
            "chat_template": functools.partial(apply_chat_template, lm.tokenizer) if chat else None,
            "tokenizer_name": _tokenizer_name(lm) if chat else "",
        }


def apply_chat_template(
    tokenizer: Any, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """One prompt's messages in the tokenizer's chat template, as lm-eval's `HFLM` and `VLLM`
    apply it (`apply_chat_template`), for every fitness backend: the text, with the generation
    prompt opened, or the last (assistant) message left open to be continued. A template that
    refuses the messages (a jinja error, as templates that take no system role raise) gets them
    again without the system message, as lm-eval retries; evomerge says so once, on the
    terminal, since the system instruction (or the task's description) is then left out."""
    import jinja2

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    try:
        return render(chat_history)
    except jinja2.exceptions.TemplateError:
        kept = [m for m in chat_history if m["role"] != "system"]
        if len(kept) == len(chat_history):  # lm-eval's retry would fail the same way
            raise
        _say_system_dropped()
        return render(kept)


@functools.cache
def _say_system_dropped() -> None:
    LOG.warning(
        "the model's chat template refuses these messages; scoring them without the system "
        "message (fitness.system_instruction, or the task's description), as lm-eval does"
    )


def _tokenizer_name(lm: TemplateLM) -> str:
    try:
        return lm.tokenizer_name
    except NotImplementedError:  # only request caches use it; evomerge caches none
        return ""


class PreparedRequests:
    """Every request of `tasks`, built and tokenised once by `lm`; `run` scores chosen documents.

    A backend's subclass gives `respond`: the responses of the given instances. `prompt` says
    how prompts are written (the chat template, a system instruction), as lm-eval's own.
    """

    def __init__(
        self, lm: TemplateLM, tasks: dict[str, Task], *, prompt: PromptFormat | None = None
    ) -> None:
        self.lm = lm
        self.tasks = tasks
        self.prompt = prompt or PromptFormat()
        self._request_kwargs = self.prompt.request_kwargs(lm)
        self.instances: list[Instance] = []
        self.docs: dict[str, dict[int, list[int]]] = {}
        """Per task, per document id: its instance ids, in lm-eval's order (`Instance.idx`)."""
        for name, task in tasks.items():
            self.docs[name] = self._build(name, task)
        self.tokens: dict[int, tuple[list[int], list[int]]] = {
            i: self._encode(*inst.args)
            for i, inst in enumerate(self.instances)
            if inst.request_type == "loglikelihood"
        }
        """loglikelihood instance id -> (context tokens, continuation tokens)."""

    def _build(self, name: str, task: Task) -> dict[int, list[int]]:
        task.build_all_requests(
            limit=None,
            samples=None,
            rank=0,
            world_size=1,
            cache_requests=False,
            **self._request_kwargs,
        )
        by_doc: dict[int, list[int]] = {}
        for inst in sorted(task.instances, key=lambda x: (x.doc_id, x.idx)):
            if inst.request_type not in ("loglikelihood", "generate_until"):
                raise UserError(
                    f"task {name!r} asks for {inst.request_type} requests; evomerge scores "
                    "loglikelihood, multiple_choice and generate_until tasks."
                )
            by_doc.setdefault(inst.doc_id, []).append(len(self.instances))
            self.instances.append(inst)
            inst.resps = [_placeholder(inst)]  # filters run over every instance of a task
        return by_doc

    def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context, continuation) tokens exactly as `TemplateLM.loglikelihood` makes them."""
        lm = self.lm
        if context:
            return lm._encode_pair(context, continuation)  # the LM's own split: the truth
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        if lm.prefix_token_id != cont[0]:
            return [lm.prefix_token_id], cont
        return cont[:1], cont[1:]

    def ids(self, wanted: dict[str, list[int]]) -> tuple[int, ...]:
        """The instance ids of `wanted`'s documents, in lm-eval's order (task, document, idx)."""
        return tuple(
            sorted({i for task, docs in wanted.items() for d in docs for i in self.docs[task][d]})
        )

    def run(self, wanted: dict[str, list[int]]) -> dict[str, Values]:
        """Per task of `wanted` (task -> document ids): per (metric, filter), the values lm-eval's
        `process_results` gives each document, in the order given."""
        self.respond(self.ids(wanted))
        return {task: self.metric_values(task, docs) for task, docs in wanted.items()}

    def respond(self, ids: tuple[int, ...]) -> None:
        """Set `resps` of the instances `ids` (as lm-eval's `evaluate` does) from the model as it
        is now."""
        raise NotImplementedError

    def metric_values(self, name: str, docs: list[int]) -> Values:
        """lm-eval's filters and `process_results` over the documents' latest responses."""
        task = self.tasks[name]
        task.apply_filters()
        by_doc = self.docs[name]
        values: Values = {}
        for filter_key in self.instances[by_doc[docs[0]][0]].filtered_resps if docs else ():
            for d in docs:
                instances = [self.instances[i] for i in by_doc[d]]
                for metric, value in task.process_results(
                    instances[0].doc, [inst.filtered_resps[filter_key] for inst in instances]
                ).items():
                    values.setdefault((metric, filter_key), []).append(value)
        return values


class HFPreparedRequests(PreparedRequests):
    """Prepared requests answered by lm-eval's `HFLM` model, batched once as HFLM batches them."""

    def __init__(
        self, lm: HFLM, tasks: dict[str, Task], *, prompt: PromptFormat | None = None
    ) -> None:
        if getattr(lm, "backend", "causal") != "causal":
            raise UserError("the hf fitness backend scores causal language models only.")
        super().__init__(lm, tasks, prompt=prompt)
        self.context_length: dict[int, int] = {
            i: len(lm.tok_encode(inst.args[0]))
            for i, inst in enumerate(self.instances)
            if i not in self.tokens
        }
        """generate_until instance id -> tokens of its context (HFLM's sort key)."""
        self._layouts: OrderedDict[tuple[int, ...], _Layout] = OrderedDict()
        self._stop_tables: dict[tuple[str, ...], torch.Tensor] = {}

    # ------------------------------------------------------------------ built once

    def _layout(self, ids: tuple[int, ...]) -> _Layout:
        layout = self._layouts.get(ids)
        if layout is None:
            ll = [i for i in ids if i in self.tokens]
            gen = [i for i in ids if i in self.context_length]
            layout = _Layout(self._ll_layout(ll) if ll else None, self._gen_layout(gen))
            self._layouts[ids] = layout
            if len(self._layouts) > LAYOUTS_KEPT:
                self._layouts.popitem(last=False)
        self._layouts.move_to_end(ids)
        return layout

    def _ll_layout(self, ids: list[int]) -> _LoglikelihoodLayout:
        lm = self.lm
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in ids:
            ctx, cont = self.tokens[i]
            key = tuple(ctx + cont[:-1]) if lm.logits_cache else (i,)
            groups.setdefault(key, []).append(i)
        # one request per group, the longest continuation; longest input first (HFLM's Collator)
        heads = {
            max(members, key=lambda i: len(self.tokens[i][1])): members
            for members in groups.values()
        }
        order = sorted(
            heads,
            key=lambda i: (
                -len(self.tokens[i][0] + self.tokens[i][1]),
                tuple(self.tokens[i][0] + self.tokens[i][1]),
            ),
        )
        size, window = lm.batch_size, lm.max_length + 1
        batches, answered, flat_places, offset = [], [], [], 0
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            # left-truncated to the model's window, the last token dropped (it predicts nothing)
            inputs = [(self.tokens[h][0] + self.tokens[h][1])[-window:][:-1] for h in chunk]
            width = max(len(x) for x in inputs)
            rows, lp_at, gr_at, targets = [], [], [], []
            for row, (head, inp) in enumerate(zip(chunk, inputs)):
                head_len = len(self.tokens[head][1])
                for member in heads[head]:
                    cont = self.tokens[member][1]
                    # HFLM gathers a member's log-probs from the head's first len(cont)
                    # positions and compares its argmax on the last len(cont) ones
                    first = len(inp) - head_len
                    rows += [row] * len(cont)
                    lp_at += range(first, first + len(cont))
                    gr_at += range(len(inp) - len(cont), len(inp))
                    targets += cont
                    answered.append(member)
                    flat_places.append(range(offset, offset + len(cont)))
                    offset += len(cont)
            padded = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, inp in enumerate(inputs):
                padded[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            batches.append(
                _LoglikelihoodBatch(
                    padded,
                    torch.tensor(rows),
                    torch.tensor(lp_at),
                    torch.tensor(gr_at),
                    torch.tensor(targets),
                )
            )
        by_length: dict[int, list[int]] = {}
        for k, places in enumerate(flat_places):
            by_length.setdefault(len(places), []).append(k)
        sums = [
            (torch.tensor(ks), torch.tensor([list(flat_places[k]) for k in ks]))
            for ks in by_length.values()
        ]
        return _LoglikelihoodLayout(batches, sums, answered)

    def _gen_layout(self, ids: list[int]) -> list[_GenerateBatch]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        lm = self.lm
        groups: dict[str, list[int]] = {}
        for i in ids:
            groups.setdefault(
                json.dumps(self.instances[i].args[1], sort_keys=True, default=str), []
            ).append(i)
        eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
        batches = []
        for members in groups.values():
            gen_kwargs = self.instances[members[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            total = kwargs.pop("max_length", None)  # HFLM: a task's max_length overrides
            if kwargs.get("do_sample") or kwargs.pop("temperature", 0.0) != 0.0:
                raise UserError(
                    f"task {self.instances[members[0]].task_name!r} samples its generations; "
                    "a fitness needs greedy ones (do_sample: false)."
                )
            order = sorted(
                members, key=lambda i: (-self.context_length[i], self.instances[i].args[0])
            )
            for start in range(0, len(order), lm.batch_size):
                chunk = order[start : start + lm.batch_size]
                inputs, mask = lm.tok_batch_encode(
                    [self.instances[i].args[0] for i in chunk],
                    left_truncate_len=lm.max_length - max_gen_toks,
                    truncation=lm.truncation,
                )
                batches.append(
                    _GenerateBatch(
                        inputs,
                        mask,
                        total or inputs.shape[1] + max_gen_toks,
                        until,
                        self._stop_table(until),
                        kwargs,
                        chunk,
                    )
                )
        return batches

    def _stop_table(self, until: list[str]) -> torch.Tensor:
        """(V,) bool: the tokens whose own text holds one of `until`, and the EOS token."""
        key = tuple(until)
        if key not in self._stop_tables:
            tok = self.lm.tokenizer
            texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
            table = torch.tensor([any(s and s in t for s in until) for t in texts])
            table[self.lm.eot_token_id] = True
            self._stop_tables[key] = table
        return self._stop_tables[key]

    # ------------------------------------------------------------------ per call

    def respond(self, ids: tuple[int, ...]) -> None:
        layout = self._layout(ids)
        with torch.no_grad():
            if layout.loglikelihood is not None:
                self._run_loglikelihood(layout.loglikelihood)
            for batch in layout.generate:
                self._run_generate(batch)

    def forward_only(self, wanted: dict[str, list[int]]) -> None:
        """The forward passes of `wanted` and nothing else (for bench/evaluator_overhead.py)."""
        layout = self._layout(self.ids(wanted))
        with torch.no_grad():
            for batch in layout.loglikelihood.batches if layout.loglikelihood else []:
                _ = self.lm.model(batch.inputs).logits  # timed, not used
            for batch in layout.generate:
                self._generate(batch)

    def _run_loglikelihood(self, layout: _LoglikelihoodLayout) -> None:
        model, dtype = self.lm.model, self.lm.softmax_dtype
        logprobs, greedy = [], []
        for b in layout.batches:
            scores = torch.log_softmax(model(b.inputs).logits, dim=-1, dtype=dtype)  # (B, T, V)
            logprobs.append(scores[b.rows, b.logprob_at, b.targets])  # (N,)
            greedy.append(scores.argmax(dim=-1)[b.rows, b.greedy_at] == b.targets)  # (N,)
        flat_lp, flat_greedy = torch.cat(logprobs), torch.cat(greedy)
        total = torch.empty(len(layout.requests), dtype=flat_lp.dtype)
        all_greedy = torch.empty(len(layout.requests), dtype=torch.bool)
        for requests, places in layout.by_length:
            total[requests] = flat_lp[places].sum(dim=-1)  # (n,) from (n, L), as HFLM sums a row
            all_greedy[requests] = flat_greedy[places].all(dim=-1)
        for i, lp, g in zip(layout.requests, total.tolist(), all_greedy.tolist()):
            inst = self.instances[i]
            inst.resps = [(lp, g)] * inst.repeats

    def _generate(self, batch: _GenerateBatch) -> torch.Tensor:
        from transformers import StoppingCriteria, StoppingCriteriaList

        table = batch.stop_tokens

        class StopTokens(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                return table[input_ids[:, -1]]  # (B,) rows whose last token ends them

        return self.lm.model.generate(
            input_ids=batch.inputs,
            attention_mask=batch.attention_mask,
            max_length=batch.max_length,
            stopping_criteria=StoppingCriteriaList([StopTokens()]),
            pad_token_id=self.lm.tokenizer.pad_token_id,
            use_cache=True,
            **batch.kwargs,
        )

    def _run_generate(self, batch: _GenerateBatch) -> None:
        from lm_eval.models.utils import postprocess_generated_text

        out = self._generate(batch)[:, batch.inputs.shape[1] :].tolist()
        for i, tokens in zip(batch.requests, out):
            text = postprocess_generated_text(self.lm.tok_decode(tokens), batch.until, None)
            inst = self.instances[i]
            inst.resps = [text] * inst.repeats


def _placeholder(inst: Instance) -> Any:
    """A response of the instance's type, so that filters can run before it is first scored."""
    return "" if inst.request_type == "generate_until" else (0.0, False)
