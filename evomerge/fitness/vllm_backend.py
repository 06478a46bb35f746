"""The "vllm" fitness backend: one vLLM engine per run, candidate weights pushed into it in place.

    engine = start_engine("runs/demo-pool/base", dtype="float32")   # once per run (~30-60 s)
    lm = VLLMLiveLM(engine, tokenizer, staging=hf_model)             # pushes hf_model's weights
    ...                                                              # the search writes hf_model
    lm.sync_weights()                                                # ... and pushes it again
    lm_eval.evaluator.evaluate(lm=lm, task_dict=...)                 # scored by the engine

The HF model stays the staging area: `CompiledCandidate` writes each merged tensor into it, as for
the "hf" backend, and `sync_weights` hands its whole state (checkpoint names, unfused) to the
engine through `LLM.collective_rpc("reload_weights", ...)`, vLLM V1's in-place reload. That goes
through each model's own `load_weights`, so q/k/v land in the fused `qkv_proj` and gate/up in
`gate_up_proj` through their `weight_loader(param, value, shard_id)`, and vLLM's layerwise
reload re-runs any kernel-format processing (CPU weight packing, ...) and copies the result
into the parameters' existing storage (compiled graphs keep pointing at it). The whole state is
pushed, never a part: a fused parameter given only some of its shards would be re-processed
with the others missing. After each push the prefix cache is reset, or requests would reuse
keys and values computed with the previous candidate's weights.

`VLLMLiveLM` is an lm-eval `TemplateLM` over that existing `vllm.LLM` (lm-eval's own `VLLM`
wrapper always builds its engine from a path). It tokenizes with the same HF tokenizer and the
same rules as lm-eval's `HFLM`, so both backends score the same token sequences.

Agreement with "hf": per-request log-likelihoods within 1e-3 (float32; observed ~1e-5), `acc`
equal but for near-ties of the top two tokens. The two backends run different kernels (vLLM's
fused RMSNorm, SiLU-and-mul, paged attention; HF's eager ops), so results agree to rounding,
not bit for bit. Sequences longer than `max_length - 1` tokens are left-truncated by one more
token than `HFLM` does (vLLM needs room for the one generated token), as lm-eval's `VLLM` does.

Per run, the requests are built and tokenised once (`VLLMPreparedRequests`, sharing
`fitness.prepared`'s request building and lm-eval metric step); a call hands the token ids of
the wanted documents straight to the engine. Prefix caching is on; vLLM V1 serves no cached
prefix to a request that asks for prompt log-probabilities (loglikelihood), so it can pay only
for generate-until requests whose contexts share a prefix (few-shot examples, a system prompt).

vLLM is imported only here, and only when the backend is built.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from evomerge.fitness.prepared import PreparedRequests, apply_chat_template
from evomerge.io.dtypes import name_of

if TYPE_CHECKING:
    import torch
    from lm_eval.api.instance import Instance
    from vllm import LLM

LOG = logging.getLogger(__name__)


def start_engine(
    model_path: str,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    seed: int = 0,
    in_process: bool = True,
    **engine_args: Any,
) -> LLM:
    """A vLLM engine over the model at `model_path` (its config, tokenizer and first weights).

    Prefix caching is on. `in_process` runs vLLM's engine core in this process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here): weight pushes then hand tensors over by
    reference, and scripts need no `__main__` guard. With `in_process=False` the engine runs in
    its own process (vLLM's default) and pushes travel as bytes. `engine_args` go to
    `vllm.LLM` as they are (`gpu_memory_utilization`, `tensor_parallel_size`, ...). On CPU, set
    `VLLM_CPU_KVCACHE_SPACE` (GiB) before calling.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    try:
        from vllm import LLM
    except ImportError as exc:
        from evomerge.errors import UserError

        raise UserError(
            f"fitness.backend 'vllm' needs vLLM ({exc}); install it with `pip install "
            "'evomerge[vllm]'` on a GPU machine, or `make vllm-venv` for the CPU build"
        ) from None

    started = time.perf_counter()
    llm = LLM(
        model=str(model_path),
        tokenizer=str(model_path),
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        enable_prefix_caching=True,
        worker_extension_cls=f"{__name__}.WeightPushExtension",
        **engine_args,
    )
    LOG.info("vLLM engine started in %.1f s", time.perf_counter() - started)
    return llm


class WeightPushExtension:
    """Mixed into vLLM's workers (`worker_extension_cls`): an RPC that takes weights as bytes.

    Used when the engine runs in its own process, where `collective_rpc` arguments are
    serialised without type information (a tensor would arrive as a list).
    """

    def evomerge_load_weights(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], blobs: list[bytes]
    ) -> None:
        import torch

        tensors = (
            torch.frombuffer(bytearray(blob), dtype=getattr(torch, dtype)).view(shape)
            for dtype, shape, blob in zip(dtypes, shapes, blobs, strict=True)
        )
        self.reload_weights(  # the worker's own in-place reload (vLLM V1)
            weights_iterator=zip(names, tensors, strict=True), is_checkpoint_format=True
        )


class VLLMLiveLM(TemplateLM):
    """An lm-eval LM scored by an existing vLLM engine whose weights follow a staging model.

    `staging` is the in-memory model the search writes candidates into (its state dict has
    checkpoint names); its weights are pushed into the engine now and on every `sync_weights`.
    """

    def __init__(
        self,
        llm: LLM,
        tokenizer: Any,
        *,
        staging: torch.nn.Module,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.staging = staging
        self._max_length = max_length
        self.max_gen_toks = max_gen_toks
        self.sync_weights()

    # --- prompts -------------------------------------------------------------------------------
    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat template applied by the function the "hf" backend's requests use too
        (`fitness.prepared.apply_chat_template`: lm-eval's HFLM's rules)."""
        return apply_chat_template(self.tokenizer, chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "").replace("/", "__")

    # --- weights ------------------------------------------------------------------------------
    def sync_weights(self) -> None:
        """Push the staging model's current weights into the engine, in place."""
        self.push_weights(self.staging.state_dict().items())

    def push_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load `(checkpoint name, tensor)` pairs into the live engine and drop cached KV.

        Give every tensor of the model (see the module docstring): fused parameters need all
        their shards in one reload.
        """
        import torch
        from vllm import envs

        with torch.no_grad():
            weights = [(name, tensor.detach()) for name, tensor in named]
            if not envs.VLLM_ENABLE_V1_MULTIPROCESSING:  # same process: tensors by reference
                self.llm.collective_rpc(
                    "reload_weights",
                    kwargs={"weights_iterator": weights, "is_checkpoint_format": True},
                )
            else:
                cpu = [t.to("cpu").contiguous() for _, t in weights]
                self.llm.collective_rpc(
                    "evomerge_load_weights",
                    args=(
                        [name for name, _ in weights],
                        [name_of(t.dtype) for t in cpu],
                        [list(t.shape) for t in cpu],
                        [t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in cpu],
                    ),
                )
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight push")

    # --- tokenization, as lm-eval's HFLM does it ----------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.llm.model_config.max_model_len

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        # a string that already starts with BOS gets no second one (HFLM's rule)
        if add_special_tokens is None and string.startswith(
            self.tokenizer.decode(self.prefix_token_id)
        ):
            kwargs["add_special_tokens"] = False
        tokens = self.tokenizer.encode(string, **kwargs)
        return tokens[-left_truncate_len:] if left_truncate_len else tokens

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # --- scoring --------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        from vllm import SamplingParams, TokensPrompt

        keep = self.max_length - 1  # the engine needs room for one generated token
        prompts, n_context = [], []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-keep:]
            prompts.append(TokensPrompt(prompt_token_ids=tokens))
            n_context.append(len(tokens) - len(continuation))
        # prompt_logprobs=1: each position's logprob of the given token, and the top-1 token
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)

        results = []
        for prompt, ctx_len, out, request in zip(
            prompts, n_context, outputs, requests, strict=True
        ):
            tokens = prompt["prompt_token_ids"]
            if ctx_len < 1:
                raise ValueError(
                    f"a request of {len(tokens)} tokens leaves no context within "
                    f"max_length {self.max_length}"
                )
            total, greedy = 0.0, True
            for token, position in zip(
                tokens[ctx_len:], out.prompt_logprobs[ctx_len:], strict=True
            ):
                total += position[token].logprob
                greedy = greedy and max(position.items(), key=lambda kv: kv[1].logprob)[0] == token
            results.append((total, greedy))
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], (total, greedy))
        return results

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    # one token of context, one of room for generation
                    max_seq_len=self.max_length - 2,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[index] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, stopped at any of the request's `until` strings or at EOS."""
        texts = self.generate_tokens([(self.tok_encode(r.args[0]), r.args[1]) for r in requests])
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def generate_tokens(self, requests: list[tuple[list[int], dict[str, Any]]]) -> list[str]:
        """`generate_until` of (context token ids, generation kwargs): contexts encoded once."""
        from vllm import SamplingParams, TokensPrompt

        # one engine call per distinct set of generation arguments
        groups: dict[str, list[int]] = defaultdict(list)
        for index, (_, kwargs) in enumerate(requests):
            groups[repr(sorted(kwargs.items()))].append(index)
        results: list[str] = [""] * len(requests)
        eos = self.tok_decode([self.eot_token_id]) if self.eot_token_id is not None else None
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]][1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0.0) > 0.0:
                LOG.warning("vllm backend: generate_until is greedy; ignoring %s", gen_kwargs)
            keep = max(1, self.max_length - max_tokens)
            prompts = [TokensPrompt(prompt_token_ids=requests[i][0][-keep:]) for i in indices]
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.0, stop=[s for s in until if s] or None
            )
            for i, out in zip(
                indices, self.llm.generate(prompts, params, use_tqdm=False), strict=True
            ):
                text = out.outputs[0].text
                for stop in until:  # vLLM already cut at a stop string; keep HFLM's rule exact
                    if stop:
                        text = text.split(stop)[0]
                results[i] = text
        return results


class VLLMPreparedRequests(PreparedRequests):
    """Prepared requests answered by a `VLLMLiveLM`, their token ids encoded once.

    The instances go to the engine in lm-eval's order (task, document, idx), as
    `lm_eval.evaluator.evaluate` sends them, so the engine batches them the same way and the
    scores equal that path's (tests/test_vllm.py).
    """

    lm: VLLMLiveLM

    def __init__(self, lm: VLLMLiveLM, tasks: dict[str, Any], *, prompt: Any = None) -> None:
        super().__init__(lm, tasks, prompt=prompt)
        self.contexts: dict[int, list[int]] = {
            i: lm.tok_encode(inst.args[0])
            for i, inst in enumerate(self.instances)
            if i not in self.tokens
        }
        """generate_until instance id -> its context's token ids."""

    def respond(self, ids: tuple[int, ...]) -> None:
        scored = [i for i in ids if i in self.tokens]
        if scored:
            pairs = [(None, *self.tokens[i]) for i in scored]
            self._answer(scored, self.lm._loglikelihood_tokens(pairs, disable_tqdm=True))
        generated = [i for i in ids if i in self.contexts]
        if generated:
            requests = [(self.contexts[i], self.instances[i].args[1]) for i in generated]
            self._answer(generated, self.lm.generate_tokens(requests))

    def _answer(self, ids: list[int], responses: list[Any]) -> None:
        for i, response in zip(ids, responses, strict=True):
            inst = self.instances[i]
            inst.resps = [response] * inst.repeats
