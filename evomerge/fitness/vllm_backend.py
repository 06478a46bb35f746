"""The "vllm" fitness backend: one vLLM engine per run, candidate weights pushed into it in place.

    engine = start_engine("runs/demo-pool/base", dtype="float32")   # once per run (~30-100 s)
    lm = VLLMLiveLM(engine, tokenizer, staging=hf_model, merge=merge_for(hf_model))
    candidate.apply(genome)                                          # hands its merges over
    lm.sync_weights()                                                # merged into the engine
    lm_eval.evaluator.evaluate(lm=lm, task_dict=...)                 # scored by the engine

Two ways to get a candidate into the engine, both through `LLM.collective_rpc("reload_weights",
...)`, vLLM V1's in-place reload, with checkpoint names, unfused:

- **merged at push** (a search's `CompiledCandidate`, either tier, engine in this process):
  the candidate hands its jobs over instead of writing them (`fitness.live_model.
  merge_at_push`), the HF model's weights are freed, and each push runs every tensor's merge
  as the engine asks for it, into a small pool of reusable buffers (`EngineMerge`: about one
  layer's tensors and the embedding): the engine's weights are the only full-size copy of the
  live model. The merges are the candidate's own, so the engine gets the same bits as from
  the old push (tests/test_vllm.py).
- **the whole staging model** (anything else: before a candidate's first trial, a candidate
  that writes the model itself, an engine in its own process, `push_weights`): the HF model
  holds the candidate and `sync_weights` hands its whole state to the engine.

Either way the reload goes
through each model's own `load_weights`, so q/k/v land in the fused `qkv_proj` and gate/up in
`gate_up_proj` through their `weight_loader(param, value, shard_id)`, and vLLM's layerwise
reload re-runs any kernel-format processing (CPU weight packing, ...) and copies the result
into the parameters' existing storage (compiled graphs keep pointing at it). On the CPU that
processing is why nothing can be written into the engine's tensors directly: vLLM packs every
linear layer's weight into a oneDNN handle and drops the parameter (`remove_weight=True` in
`dispatch_cpu_unquantized_gemm`), so a fused module (qkv_proj, gate_up_proj) is rebuilt from
all its shards at once, when its last one arrives (until then vLLM holds the shards it was
handed: a buffer is reused only once vLLM has let go of it). Hence the whole state is pushed,
never a part: a fused parameter given only some of its shards would be re-processed with the
others missing, and a module given none logs a warning (pushing only what changed needs the
map from checkpoint names to the engine's modules). The head of tied embeddings is sent too, as
the old push did: vLLM's tied head rebuilds its packed copy from it. After each push the prefix
cache is reset, or requests would reuse keys and values computed with the previous candidate's
weights.

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
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
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


def write_engine_folder(model: torch.nn.Module, tokenizer: Any) -> Path:
    """A new temporary folder to start an engine from, for a live model its own folder does not
    describe (`live_model.in_folder_vocabulary`: an aligned vocabulary, a chosen chat
    template). It holds the live model as it is: config.json (its `vocab_size` and token ids),
    generation_config.json (the output's end-of-sequence and end-of-turn tokens, which the
    engine stops on, as HF's `generate` does), its weights as safetensors (of the output's
    shapes; the engine reads them at start only, each push replaces them) and `tokenizer`, chat
    template included. The caller removes it (`shutil.rmtree`)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="evomerge-engine-"))
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


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


class EngineMerge:
    """The live model's weights as its engines are to hold them, when a candidate's merges are
    run at push time (see the module notes): per checkpoint tensor, the candidate, job index and
    parameters of its latest merge, or, for a tensor no merge has written yet, its value.

    Shared by every engine over one model (`merge_for`): each push runs the merges again,
    into reusable buffers, so no full-size copy is kept. The first candidate to hand its jobs
    over (`take`) frees the HF model's weights: from then on it is config and tokenizer only.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.version = 0
        """How many materialisations were taken (0: none; engines push the staging model)."""
        self.order: list[str] = []
        self.layout: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self.sources: dict[str, tuple[Any, int, dict[str, Any]] | torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        """A tensor that is another's (the head of tied embeddings) -> that other's name."""
        self.buffers = _Buffers()

    def take(self, candidate: Any, runs: list[tuple[int, dict[str, Any]]]) -> None:
        """A candidate's materialisation (`fitness.live_model.merge_at_push`): `runs`, the
        (job index, parameters) pairs to merge on the next push."""
        names = [job.name for job in candidate.jobs]
        if not self.version:
            self._free_the_model(names, {names[i] for i, _ in runs})
        for index, parameters in runs:
            self.sources[names[index]] = (candidate, index, parameters)
        self.version += 1

    def _free_the_model(self, merged: list[str], now: set[str]) -> None:
        """Note the push order (the candidate's job order, which its host tier's copies follow,
        then any tensor no job writes) and keep the values of the tensors no run of this first
        materialisation writes; then free the HF model's weights (every later use of them
        fails loudly: they have no elements)."""
        import torch

        state = self.model.state_dict(keep_vars=True)
        unknown = sorted(set(merged) - set(state))
        if unknown:
            raise ValueError(f"the live model has no tensors {unknown[:3]}")
        owner = {state[name].data_ptr(): name for name in reversed(merged)}
        rest = [n for n in state if n not in set(merged)]
        for name in [*merged, *rest]:
            tensor = state[name]
            self.order.append(name)
            self.layout[name] = (tensor.shape, tensor.dtype, tensor.device)
            if name in rest and tensor.data_ptr() in owner:
                # pushed again as the old full push did: vLLM's tied head takes it (and
                # rebuilds its own packed copy of the embedding from it)
                self.aliases[name] = owner[tensor.data_ptr()]
            elif name not in now:
                self.sources[name] = tensor.detach().clone()
        with torch.no_grad():
            for tensor in {id(t): t for t in state.values()}.values():
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)

    def push(self) -> _Push:
        """The weights of one push, each merge run as the engine takes its tensor."""
        return _Push(self)


class _Push:
    """One push's `(name, tensor)` pairs, merged on the way. It never raises inside the engine's
    reload (that would leave the engine's layers half reloaded): a merge that fails is noted,
    the rest are sent as zeros, and `check` raises after the reload has finished."""

    def __init__(self, merge: EngineMerge) -> None:
        self.merge = merge
        self.not_finite: list[str] = []
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        # consumed inside the engine's reload, under its no_grad (`VLLMLiveLM._reload`)
        wanted = set(self.merge.aliases.values())
        held: dict[str, torch.Tensor] = {}  # tensors their aliases will send again
        for name in self.merge.order:
            if name in self.merge.aliases:
                yield name, held.pop(self.merge.aliases[name])
                continue
            tensor = self._tensor(name)
            if name in wanted:
                held[name] = tensor
            yield name, tensor

    def _tensor(self, name: str) -> torch.Tensor:
        source = self.merge.sources[name]
        if not isinstance(source, tuple):
            return source
        candidate, index, parameters = source
        out = self.merge.buffers.take(*self.merge.layout[name])
        if self.error is None:
            try:
                if not candidate.run_into(index, parameters, out):
                    self.not_finite.append(name)
            except BaseException as exc:  # Ctrl-C too: finish the reload first
                self.error = exc
        if self.error is not None:
            out.zero_()
        return out

    def check(self) -> None:
        from evomerge.errors import CandidateError

        if self.error is not None:
            raise self.error
        if self.not_finite:
            raise CandidateError(f"the merged tensor {self.not_finite[0]!r} has NaN or Inf values")


class _Buffers:
    """Memory for merged tensors on their way into the engine, reused from push to push: a
    free list per (shape, dtype, device). A buffer is free again once the engine has let go of
    the tensor it was handed (vLLM holds a fused module's shards until its last one arrives),
    so the pool holds about one layer's tensors and the largest other one."""

    def __init__(self) -> None:
        self.pools: dict[tuple, list[list[Any]]] = defaultdict(list)

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        import torch

        pool = self.pools[(tuple(shape), dtype, str(device))]
        entry = next((e for e in pool if e[1] is None or e[1]() is None), None)
        if entry is None:
            entry = [torch.empty(shape, dtype=dtype, device=device), None]
            pool.append(entry)
        handed = entry[0].view(shape)  # a tensor of its own, whose life shows the engine's use
        entry[1] = weakref.ref(handed)
        return handed

    @property
    def bytes(self) -> int:
        return sum(e[0].nbytes for pool in self.pools.values() for e in pool)


def merge_for(model: torch.nn.Module) -> EngineMerge:
    """The `EngineMerge` of `model`, made and registered (`merge_at_push`) on first use."""
    from evomerge.fitness.live_model import merge_at_push, set_merge_at_push

    take = merge_at_push(model)
    if take is None:
        merge = EngineMerge(model)
        set_merge_at_push(model, merge.take)
        return merge
    return take.__self__


class VLLMLiveLM(TemplateLM):
    """An lm-eval LM scored by an existing vLLM engine whose weights follow the live model.

    `staging` is the in-memory model the search writes candidates into (its state dict has
    checkpoint names); its weights are pushed into the engine now and on every `sync_weights`.
    With `merge` (an in-process engine), once a candidate hands its merges over (`EngineMerge`)
    every later `sync_weights` runs them into the engine instead, and `staging` is freed.
    """

    def __init__(
        self,
        llm: LLM,
        tokenizer: Any,
        *,
        staging: torch.nn.Module,
        merge: EngineMerge | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ) -> None:
        from vllm import envs

        super().__init__()
        if merge is not None and envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise ValueError("merging at push time needs the engine in this process")
        self.llm = llm
        self.tokenizer = tokenizer
        self.staging = staging
        self.merge = merge
        self.pushed: int | None = None  # the merge's version the engine holds (None: another)
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
        """Push the live model's current weights into the engine, in place: the candidate's
        merges run on the way where it handed them over, else the staging model's state."""
        if self.merge is None or not self.merge.version:
            self.push_weights(self.staging.state_dict().items())
            return
        if self.pushed == self.merge.version:
            return  # the engine holds these weights already
        push = self.merge.push()
        self._reload(push)
        self.pushed = self.merge.version
        push.check()

    def push_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load `(checkpoint name, tensor)` pairs into the live engine and drop cached KV.

        Give every tensor of the model (see the module notes): fused parameters need all
        their shards in one reload.
        """
        import torch
        from vllm import envs

        self.pushed = None  # the next sync pushes the candidate again
        if not envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            self._reload((name, tensor.detach()) for name, tensor in named)
            return
        with torch.no_grad():
            weights = [(name, tensor.detach()) for name, tensor in named]
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
        self._reset_prefix_cache()

    def _reload(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The in-process reload: tensors by reference, taken one at a time from `named` (the
        very tensor objects: `_Buffers` watches their lifetimes)."""
        import torch

        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": iter(named), "is_checkpoint_format": True},
            )
        self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
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
