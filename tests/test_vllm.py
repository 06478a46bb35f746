"""The vllm fitness backend against the hf one, on the small demo pool with one live engine, and
on the real-model pool (SmolLM2-135M-Instruct, `tests/test_real_model.py`'s cached build).

Needs vLLM (`make vllm-venv`), so it runs in its own lane, not in `make test`:

    make test-vllm  # runs: .venv-vllm/bin/python -m pytest -q -m vllm \\
                    #   tests/test_moe.py tests/test_vllm.py

Elsewhere it is skipped. Agreement is to rounding, not bit for bit (different kernels; see
`evomerge.fitness.vllm_backend`): per-request log-likelihoods within `LOGPROB_TOL`, metrics
within `METRIC_RTOL`, `acc` within one example. Swapping the same weights back into the same
engine must reproduce its own earlier scores exactly, and the evaluator's requests built once
must score exactly as `lm_eval.evaluator.evaluate` over the same engine does. A search's merges
run at push time (`vllm_backend.EngineMerge`) must score exactly as the same candidate written
into a full staging model and pushed whole.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
from helpers.pool_fixtures import pool_search_config
from test_prepared import FILTERED, _assert_same, _per_doc, _reference
from test_real_model import smol_pool  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

pytest.importorskip(
    "vllm", reason="vLLM is not installed here: `make vllm-venv`, then `make test-vllm`"
)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU build

LOGPROB_TOL = 1e-3  # float32, observed ~1e-5 on the small pool
METRIC_RTOL = 1e-4
TASKS = ["evomerge_add", "evomerge_rev", "evomerge_sort"]


@pytest.fixture(scope="module")
def search(small_pool: Path, tmp_path_factory: pytest.TempPathFactory):
    """A search whose evaluator is a live vLLM engine (started once for the module)."""
    from evomerge.search.config import RunConfig
    from evomerge.search.loop import Search

    config = RunConfig.model_validate(
        pool_search_config(
            small_pool,
            tasks=TASKS,
            subset=8,
            backend="vllm",
            search={"sampler": "cmaes", "trials": 4, "seed": 3},
        )
    )
    return Search(config, tmp_path_factory.mktemp("vllm-run"))


@pytest.fixture(scope="module")
def hf(search, small_pool_models: dict, tmp_path_factory: pytest.TempPathFactory):
    """The hf backend on the same tasks, over a private model with a candidate of its own that
    writes each genome into it (a full staging model, as the vllm backend's old push had)."""
    from evomerge.fitness import Evaluator
    from evomerge.search.loop import make_candidate

    config = search.config.fitness.model_copy(update={"backend": "hf"})
    live = copy.deepcopy(small_pool_models["base"])
    evaluator = Evaluator(
        live, small_pool_models["tokenizer"], config, tmp_path_factory.mktemp("hf")
    )
    evaluator.candidate = make_candidate(live, search.space, search.config)
    return evaluator


def _merge(search, hf, genome: dict) -> None:
    """Materialise `genome` in the vllm run (merged at push time) and in the hf model."""
    search.candidate.apply(genome)
    search.evaluator.sync_weights()
    hf.candidate.apply(genome)


def _push_base(search, small_pool_models: dict) -> None:
    """The pool's base pushed whole into the vllm run's engine (the full push)."""
    search.evaluator.lm.push_weights(small_pool_models["base"].state_dict().items())


def _assert_agree(vllm_result, hf_result) -> None:
    for task in TASKS:
        n = vllm_result.n_examples[task]
        got, want = vllm_result.metrics[task], hf_result.metrics[task]
        assert abs(got["acc,none"] - want["acc,none"]) <= 1 / n + 1e-12, (task, got, want)
        assert math.isclose(got["perplexity,none"], want["perplexity,none"], rel_tol=METRIC_RTOL), (
            task,
            got,
            want,
        )


def _requests(small_pool: Path, count: int = 12):
    from lm_eval.api.instance import Instance

    out = []
    for task in ("add", "rev", "sort"):
        lines = (small_pool / "tasks" / "data" / f"{task}_test.jsonl").read_text().splitlines()
        for line in lines[: count // 3]:
            doc = json.loads(line)
            out.append(
                Instance(
                    request_type="loglikelihood",
                    doc=doc,
                    arguments=(doc["prompt"], doc["answer"]),
                    idx=0,
                )
            )
    return out


def test_base_merged_and_back(search, hf, small_pool: Path, small_pool_models: dict) -> None:
    """Score the base, push a merge in, score it, push the base back: same scores as hf, and
    the base's scores reproduced exactly by the same engine."""
    lm = search.evaluator.lm
    requests = _requests(small_pool)

    base = search.evaluator.score(full=True)
    _assert_agree(base, hf.score(full=True))
    base_ll = lm.loglikelihood(requests)

    # a real merge of the pool (task arithmetic, equal weights), through the search's own path
    _merge(search, hf, search.space.baselines()["uniform"])
    merged = search.evaluator.score(full=True)
    merged_hf = hf.score(full=True)
    _assert_agree(merged, merged_hf)
    assert merged.metrics != base.metrics  # the engine really scored the new weights
    for (got, got_greedy), (want, want_greedy) in zip(
        lm.loglikelihood(requests), hf.lm.loglikelihood(requests), strict=True
    ):
        assert abs(got - want) <= LOGPROB_TOL
        assert got_greedy == want_greedy

    _push_base(search, small_pool_models)
    again = search.evaluator.score(full=True)
    assert again.metrics == base.metrics
    assert lm.loglikelihood(requests) == base_ll

    # after a full push the next sync runs the candidate's merges into the engine again
    search.evaluator.sync_weights()
    assert search.evaluator.score(full=True).metrics == merged.metrics
    _push_base(search, small_pool_models)


def test_merged_at_push_scores_as_the_full_push(search, hf, small_pool: Path) -> None:
    """A genome merged tensor by tensor into the engine, and the same genome written into a
    full staging model pushed whole (the old path): the same scores, bit for bit; the search's
    own HF model holds no weights, the buffers a small part of one model."""
    lm, genome = (
        search.evaluator.lm,
        {g.name: 0.2 + 0.3 * i for i, g in enumerate(search.space.genes)},
    )
    requests = _requests(small_pool)
    _merge(search, hf, genome)
    fast, fast_ll = search.evaluator.score(full=True), lm.loglikelihood(requests)
    lm.push_weights(hf.model.state_dict().items())  # the staging model's whole state
    assert search.evaluator.score(full=True).metrics == fast.metrics
    assert lm.loglikelihood(requests) == fast_ll

    assert all(t.numel() == 0 for t in lm.staging.state_dict().values())
    model_bytes = sum(t.nbytes for t in hf.model.state_dict().values())
    assert 0 < lm.merge.buffers.bytes < model_bytes / 2


def test_merged_at_push_from_the_host_tier_scores_as_from_the_device_tier(
    search, small_pool: Path
) -> None:
    """A TIES space's genome through a candidate whose inputs stay in host memory and are
    streamed through its staging buffer (`search.tier: host`) and through one whose inputs are
    resident, both merged at push time into the run's engine: the same scores."""
    from evomerge.search.config import RunConfig
    from evomerge.search.run_folder import build_space
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    config = RunConfig.model_validate(
        pool_search_config(
            small_pool, tasks=TASKS, subset=8, space="ties_layers", search={"trials": 1}
        )
    )
    space = build_space(config)
    genome = {g.name: (g.low + g.high) / 2 for g in space.genes}
    scores = {}
    for tier in ("device", "host"):
        candidate = CompiledCandidate(search.evaluator.model, space, seed=5, tier=tier)
        assert (candidate.staging is not None) == (tier == "host")  # the streamed path
        candidate.apply(genome)
        search.evaluator.sync_weights()
        scores[tier] = search.evaluator.score(full=True).metrics
    assert scores["host"] == scores["device"]


class _Candidate:
    """A stand-in candidate of two jobs (a Linear's weight and bias): fills with `value`."""

    jobs = [type("Job", (), {"name": name}) for name in ("weight", "bias")]

    def run_into(self, index: int, parameters: dict, out) -> bool:
        if parameters.get("fail"):
            raise RuntimeError("out of memory")
        out.fill_(parameters["value"])
        return out.isfinite().all().item()


def test_engine_merge_frees_the_model_reuses_its_buffers_and_raises_after_the_push() -> None:
    """No engine: what one push hands over, merge by merge."""
    import torch

    from evomerge.errors import CandidateError
    from evomerge.fitness.vllm_backend import EngineMerge

    model = torch.nn.Linear(4, 3)
    merge, candidate = EngineMerge(model), _Candidate()
    merge.take(candidate, [(0, {"value": 1.0}), (1, {"value": 2.0})])
    assert model.weight.numel() == model.bias.numel() == 0  # the staging model is gone
    for _ in range(2):
        push = merge.push()
        assert [(name, tensor.sum().item()) for name, tensor in push] == [
            ("weight", 12.0),
            ("bias", 6.0),
        ]
        push.check()
    assert merge.buffers.bytes == (12 + 3) * 4  # one buffer per tensor, reused

    merge.take(candidate, [(1, {"value": float("nan")})])  # the weight's last merge stays
    push = merge.push()
    assert [(name, tensor.sum().item()) for name, tensor in push][0] == ("weight", 12.0)
    with pytest.raises(CandidateError, match="'bias' has NaN or Inf"):
        push.check()

    merge.take(candidate, [(0, {"fail": True}), (1, {"value": 2.0})])
    push = merge.push()
    assert [tensor.abs().sum().item() for _, tensor in push] == [0.0, 0.0]  # the rest: zeros
    with pytest.raises(RuntimeError, match="out of memory"):
        push.check()


def test_prepared_requests_score_as_lm_eval_evaluate(
    search, tmp_path: Path, small_pool_models: dict
) -> None:
    """Base and a merge pushed into the engine: full set, subset and chosen documents equal
    `lm_eval.evaluator.evaluate` over the same live LM (same engine, same weights) bit for bit."""
    lm = search.evaluator.lm
    assert lm.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    _assert_same(search.evaluator, lm, tmp_path / "base")

    search.candidate.apply(search.space.baselines()["uniform"])
    search.evaluator.sync_weights()
    _assert_same(search.evaluator, lm, tmp_path / "merged")

    _push_base(search, small_pool_models)


def test_prepared_generate_until_scores_as_lm_eval_evaluate(
    search, small_pool: Path, tmp_path: Path
) -> None:
    """A generate-until task with a regex filter (over the pool's rev data), every document."""
    from evomerge.fitness import FitnessConfig
    from evomerge.fitness.tasks import build_task_set
    from evomerge.fitness.vllm_backend import VLLMPreparedRequests

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "filtered.yaml").write_text(
        FILTERED.format(data=small_pool / "tasks" / "data" / "rev_dev.jsonl")
    )
    config = FitnessConfig(tasks=["evomerge_shift_filtered"], task_paths=[folder])
    lm = search.evaluator.lm
    tasks = build_task_set(config, tmp_path / "run")
    docs = list(range(tasks.n_docs["evomerge_shift_filtered"]))
    prepared = VLLMPreparedRequests(lm, tasks.leaf_tasks)
    got = prepared.run({"evomerge_shift_filtered": docs})["evomerge_shift_filtered"]
    reference = _reference(lm, config, tmp_path / "ref")["evomerge_shift_filtered"][1]
    want = _per_doc(reference, "exact_match,strict-match")
    assert got[("exact_match", "strict-match")] == [want[d] for d in docs]


def test_rolling_and_greedy_generation_agree_with_hf(search, hf) -> None:
    from lm_eval.api.instance import Instance

    _merge(search, hf, search.space.baselines()["uniform"])
    texts = ["a:37+8=45.", "r:abcd=dcba.", "s:dbca=abcd."]
    rolling = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in texts
    ]
    for got, want in zip(
        search.evaluator.lm.loglikelihood_rolling(rolling),
        hf.lm.loglikelihood_rolling(rolling),
        strict=True,
    ):
        assert abs(got - want) <= LOGPROB_TOL

    until = {"until": ["."], "max_gen_toks": 8, "do_sample": False}
    prompts = ["a:37+8=", "r:abcd=", "s:dbca="]
    generate = [
        Instance(request_type="generate_until", doc={}, arguments=(p, until), idx=0)
        for p in prompts
    ]
    assert search.evaluator.lm.generate_until(generate) == hf.lm.generate_until(generate)


def test_search_trials_complete_on_the_engine(search) -> None:
    from optuna.trial import TrialState

    search.run(until=4, progress=False)
    trials = search.study.get_trials(deepcopy=False)
    assert len(trials) == 4
    assert all(t.state == TrialState.COMPLETE for t in trials), [
        t.user_attrs.get("fail_reason") for t in trials
    ]
    assert len({t.value for t in trials}) > 1  # different merges, different scores


# --- the real model (issue 28, 29) -----------------------------------------------------------
SMOL_SKILLS = ("arith", "words", "order")
CHATS = ["37+48=", "47 in words:", "sort 5 2 9 1", "What is the capital of France?"]
MAX_NEW = 48


@pytest.fixture(scope="module")
def smol_merged(smol_pool: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """`evomerge merge` of task arithmetic over the real pool's three LoRA adapters."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("smol-merged")
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {smol_pool}/base\n"
        "models:\n"
        + "".join(
            f"  - model: {smol_pool}/base+{smol_pool}/{s}\n    parameters: {{weight: 0.5}}\n"
            for s in SMOL_SKILLS
        )
        + "dtype: float32\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "evomerge", "merge", str(recipe), str(folder / "out")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    return folder / "out"


def test_real_merge_in_vllm_has_the_same_tokens_stops_and_scores(
    smol_pool: Path,  # noqa: F811
    smol_merged: Path,
    tmp_path: Path,
) -> None:
    """The merged real model, loaded in vLLM and in transformers: greedy chat replies are the
    same tokens, both ending at the same stop token of the model's generation config; one task
    scored by both backends: the same acc, log-likelihoods within LOGPROB_TOL."""
    import torch
    from transformers import GenerationConfig
    from vllm import SamplingParams, TokensPrompt

    from evomerge.fitness import Evaluator, FitnessConfig
    from evomerge.fitness.live_model import load_live_model

    model, tokenizer = load_live_model(smol_merged)
    config = FitnessConfig(
        tasks=["evomerge_arith"],
        task_paths=[smol_pool / "tasks"],
        apply_chat_template=True,
        backend="vllm",
    )
    on_vllm = Evaluator(model, tokenizer, config, tmp_path / "vllm")
    on_hf = Evaluator(
        model, tokenizer, config.model_copy(update={"backend": "hf"}), tmp_path / "hf"
    )

    eos = GenerationConfig.from_pretrained(smol_merged).eos_token_id
    stops = {eos} if isinstance(eos, int) else set(eos)
    assert tokenizer.eos_token_id in stops
    stopped = 0
    for question in CHATS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            hf_new = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)[
                0, len(ids) :
            ].tolist()
        (out,) = on_vllm.lm.llm.generate(
            [TokensPrompt(prompt_token_ids=ids)],
            SamplingParams(max_tokens=MAX_NEW, temperature=0.0),
            use_tqdm=False,
        )
        reply = out.outputs[0]
        assert list(reply.token_ids) == hf_new, question
        if len(hf_new) < MAX_NEW:  # transformers stopped: at a stop token, and so did vLLM
            assert hf_new[-1] in stops and reply.finish_reason == "stop", question
            stopped += 1
        else:
            assert reply.finish_reason == "length", question
    assert stopped >= 2  # the stop behaviour was checked, not only lengths

    got, want = on_vllm.score(full=True), on_hf.score(full=True)
    assert got.metrics["evomerge_arith"]["acc,none"] == want.metrics["evomerge_arith"]["acc,none"]
    requests = [i for i in on_vllm.prepared.instances if i.request_type == "loglikelihood"]
    assert requests
    for (a, a_greedy), (b, b_greedy) in zip(
        on_vllm.lm.loglikelihood(requests), on_hf.lm.loglikelihood(requests), strict=True
    ):
        assert abs(a - b) <= LOGPROB_TOL
        assert a_greedy == b_greedy


def test_merged_at_push_scores_as_the_full_push_on_the_real_pool(
    smol_pool: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """On the real pool (LoRA adapters kept factored, tied embeddings, 30 layers): a genome
    merged at push time and the same genome written into a full staging model pushed whole
    score the same, bit for bit."""
    import torch

    from evomerge.fitness.live_model import load_live_model
    from evomerge.search.config import RunConfig
    from evomerge.search.loop import Search, make_candidate

    pool = smol_pool
    config = RunConfig.model_validate(
        {
            "pool": {
                "base": str(pool / "base"),
                "models": {s: f"{pool}/base+{pool}/{s}" for s in SMOL_SKILLS},
                "dtype": "float32",
            },
            "space": {"method": "task_arithmetic", "search": {"weight": [0.0, 1.0]}},
            "fitness": {
                "task_paths": [str(pool / "tasks")],
                "tasks": [f"evomerge_{s}" for s in SMOL_SKILLS],
                "apply_chat_template": True,
                "subset": {"count": 8},
                "backend": "vllm",
            },
            "search": {"sampler": "random", "trials": 2, "seed": 0},
            "threads": 1,
        }
    )
    search = Search(config, tmp_path / "run")
    lm = search.evaluator.lm
    genome = {g.name: 0.3 + 0.2 * i for i, g in enumerate(search.space.genes)}
    requests = [i for i in search.evaluator.prepared.instances if i.request_type == "loglikelihood"]

    search.candidate.apply(genome)
    search.evaluator.sync_weights()
    fast, fast_ll = search.evaluator.score(full=True), lm.loglikelihood(requests[:24])
    assert all(t.numel() == 0 for t in lm.staging.state_dict().values())
    # the tied head is sent as the old push sent it (vLLM rebuilds its packed head from it)
    assert lm.merge.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    tied = ("lm_head.weight", "model.embed_tokens.weight")
    sent = {name: tensor for name, tensor in lm.merge.push() if name in tied}
    assert sent["lm_head.weight"] is sent["model.embed_tokens.weight"]

    staging, _ = load_live_model(pool / "base", dtype=torch.float32)
    make_candidate(staging, search.space, config).apply(genome)
    lm.push_weights(staging.state_dict().items())
    assert search.evaluator.score(full=True).metrics == fast.metrics
    assert lm.loglikelihood(requests[:24]) == fast_ll


# --- an aligned vocabulary and a chosen chat template (issue 28) ------------------------------
@pytest.fixture(scope="module")
def aligned(small_pool: Path, tmp_path_factory: pytest.TempPathFactory):
    """A vllm search over a pool whose `add` fine-tune added a chat token (`<|im_end|>`), aligned
    by `tokenizer_source: union`, with `chat_template: chatml`; and the hf backend over its own
    live model in the same output vocabulary, with a candidate of its own."""
    from test_search_vocabulary import widened

    from evomerge.fitness import Evaluator
    from evomerge.search.config import RunConfig
    from evomerge.search.loop import Search, load_eval_model, make_candidate

    data = pool_search_config(
        small_pool,
        tasks=TASKS,
        subset=8,
        backend="vllm",
        search={"sampler": "random", "trials": 3, "seed": 1, "baselines": False},
    )
    chat_add = widened(small_pool / "add", tmp_path_factory.mktemp("vocab") / "add-chat")
    data["pool"]["models"]["add"] = str(chat_add)
    data["pool"].update(tokenizer_source="union", chat_template="chatml")
    config = RunConfig.model_validate(data)
    search = Search(config, tmp_path_factory.mktemp("aligned-run"))
    model, tokenizer = load_eval_model(config)
    hf = Evaluator(
        model,
        tokenizer,
        config.fitness.model_copy(update={"backend": "hf"}),
        tmp_path_factory.mktemp("aligned-hf"),
    )
    hf.candidate = make_candidate(model, search.space, config)
    return search, hf


def test_aligned_vocabulary_engine_scores_as_hf(aligned, small_pool: Path) -> None:
    """The engine starts from a copy of the live model in the output vocabulary (its rows, its
    tokenizer with the chosen template, its stop tokens) and scores a genome as hf does."""
    from evomerge.merging.chat import resolve_chat_template

    search, hf = aligned
    lm = search.evaluator.lm
    end_of_turn = hf.lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert hf.model.config.vocab_size == 46  # the union: the base's 45 and the chat token
    folder = Path(lm.llm.model_config.model)
    assert folder.name.startswith("evomerge-engine-")
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 46
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert end_of_turn in (stops if isinstance(stops, list) else [stops])
    assert lm.llm.get_tokenizer().convert_tokens_to_ids("<|im_end|>") == end_of_turn
    assert lm.tokenizer.chat_template == resolve_chat_template("chatml", [])

    _merge(search, hf, {g.name: 0.2 + 0.3 * i for i, g in enumerate(search.space.genes)})
    got, want = search.evaluator.score(full=True), hf.score(full=True)
    for task in TASKS:
        assert got.metrics[task]["acc,none"] == want.metrics[task]["acc,none"], task
    _assert_agree(got, want)
    requests = _requests(small_pool)
    for (got_ll, got_greedy), (want_ll, want_greedy) in zip(
        lm.loglikelihood(requests), hf.lm.loglikelihood(requests), strict=True
    ):
        assert abs(got_ll - want_ll) <= LOGPROB_TOL
        assert got_greedy == want_greedy


def test_aligned_vocabulary_engine_stops_on_the_chatml_end_of_turn(aligned) -> None:
    """Greedy generation stops on `<|im_end|>` (generation_config's end-of-turn token) in the
    engine as in HF's `generate`: the head's row of it made to outscore "." after a merge."""
    import torch
    from lm_eval.api.instance import Instance
    from vllm import SamplingParams, TokensPrompt

    search, hf = aligned
    lm, tokenizer = search.evaluator.lm, hf.lm.tokenizer
    _merge(search, hf, search.space.baselines()["uniform"])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        head = hf.model.get_output_embeddings().weight
        head[end_of_turn] = 2.0 * head[tokenizer.convert_tokens_to_ids(".")]
    lm.push_weights(hf.model.state_dict().items())

    prompt = tokenizer.encode("a:37+8=")
    hf_ids = hf.model.generate(
        torch.tensor([prompt]), max_new_tokens=16, do_sample=False, num_beams=1
    )[0, len(prompt) :].tolist()
    assert hf_ids[-1] == end_of_turn and len(hf_ids) < 16, hf_ids
    params = SamplingParams(max_tokens=16, temperature=0.0, detokenize=False)
    out = lm.llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    engine = out[0].outputs[0]
    assert list(engine.token_ids) == hf_ids and engine.finish_reason == "stop"

    until = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    generate = [
        Instance(request_type="generate_until", doc={}, arguments=(p, until), idx=0)
        for p in ("a:37+8=", "r:abcd=", "s:dbca=")
    ]
    assert lm.generate_until(generate) == hf.lm.generate_until(generate)
    search.evaluator.sync_weights()  # the candidate's merges back in the engine


def test_aligned_vocabulary_search_trials_complete_on_the_engine(aligned) -> None:
    from optuna.trial import TrialState

    search, _ = aligned
    search.run(until=3, progress=False)
    trials = search.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [
        t.user_attrs.get("fail_reason") for t in trials
    ]
    assert len({t.value for t in trials}) > 1
