"""Issue 31's smaller items: one threads rule for every command, the base of several
`base+adapter` models read once per output tensor, and the chat template applied by one function
on both fitness backends."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from evomerge.cli import cli, process

# --- one threads rule ----------------------------------------------------------------------

COMMANDS = ("merge", "eval", "search", "resume", "worker")


class _Stop(Exception):
    """Raised by the spy in place of setting the threads: the command goes no further."""


class _Config(SimpleNamespace):
    """What search, resume and worker read of a run config before they set the threads."""

    def model_copy(self, update=None):
        return self


def _spy_threads(monkeypatch) -> list[int]:
    resolved: list[int] = []

    def spy(threads=None, config_threads=None):
        resolved.append(process.resolve_threads(threads, config_threads))
        raise _Stop

    monkeypatch.setattr(process, "set_threads", spy)
    return resolved


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_every_command_states_the_one_threads_rule():
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        help_text = _one_line(result.output)
        assert "--threads" in help_text, name
        assert f"{process.THREADS_DEFAULT})" in help_text, name
        with_config = "the config's `threads`, else" in help_text
        assert with_config == (name in ("search", "resume", "worker")), name


def test_resolve_threads_is_the_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert process.resolve_threads(None) == 1
    assert process.resolve_threads(None, 3) == 3
    assert process.resolve_threads(2, 3) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert process.resolve_threads(None) == 4
    assert process.resolve_threads(None, 3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert process.resolve_threads(None) == 1


def test_every_command_sets_its_threads_by_the_one_rule(monkeypatch, tmp_path: Path):
    """merge, eval, search, resume and worker all resolve their threads through
    `process.resolve_threads` (before: merge took all cores, eval 1, search the config's)."""
    import evomerge.search.config
    import evomerge.search.run_folder

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    resolved = _spy_threads(monkeypatch)
    config = _Config(threads=None, device="cpu", fitness=_Config(offline=True), search=_Config())
    monkeypatch.setattr(evomerge.search.config, "load_run_config", lambda path: config)
    monkeypatch.setattr(evomerge.search.run_folder, "read_run_folder", lambda path: config)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    (tmp_path / "model").mkdir()
    calls = {
        "merge": ["merge", str(recipe), str(tmp_path / "out")],
        "eval": ["eval", str(tmp_path / "model"), "--tasks", "t"],
        "search": ["search", str(tmp_path / "search.yaml"), "--run-dir", str(tmp_path / "r")],
        "resume": ["resume", str(tmp_path / "r")],
        "worker": ["worker", str(tmp_path / "r")],
    }
    runner = CliRunner()
    for name, args in calls.items():
        for extra, config_threads, expected in (
            ([], None, 1),
            (["--threads", "3"], None, 3),
            ([], 5, 5 if name in ("search", "resume", "worker") else 1),
        ):
            config.threads = config_threads
            resolved.clear()
            result = runner.invoke(cli, [*args, *extra])
            assert isinstance(result.exception, _Stop), (name, result.output, result.exception)
            assert resolved == [expected], (name, extra, config_threads)


def test_set_threads_sets_torch_and_openmp(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert process.set_threads(None) == 1
        assert torch.get_num_threads() == 1
        assert process.set_threads(2) == 2
        assert torch.get_num_threads() == 2
        import os

        assert os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)


# --- the base of several adapters read once -------------------------------------------------


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def adapter_pool(request, tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama `base`, a full fine-tune `ft0` and three PEFT LoRA adapters of the base."""
    import torch
    from helpers.tiny_models import build_tiny_pool, write_adapter

    dtype = torch.float32 if request.param == "fp32" else torch.bfloat16
    root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    folders = build_tiny_pool(root, dtype=dtype, n_models=1)
    for seed in range(3):
        folders[f"lora{seed}"] = write_adapter(
            root / f"lora{seed}", folders["base"], dtype=dtype, seed=seed
        )
    return folders


def _recipe(method: str, base: Path, models: list[str], dtype: str | None) -> str:
    from evomerge.methods.registry import get_method

    declared = {param.name for param in get_method(method).params}
    lines = [f"merge_method: {method}", f"base_model: {base}"]
    if dtype:
        lines.append(f"dtype: {dtype}")
    if "weight" in declared:  # for a method that merges the base as one more model (linear)
        lines.append("parameters: {weight: 0.2}")
    lines.append("models:")
    for index, model in enumerate(models):
        given = {"weight": 0.3 + 0.2 * index, "density": 0.6}
        kept = ", ".join(f"{k}: {v}" for k, v in given.items() if k in declared)
        lines += [f"  - model: {model}", f"    parameters: {{{kept}}}"]
    return "\n".join(lines) + "\n"


def _many_model_methods() -> list[str]:
    """Every method that merges any number of models but RegMean (which needs statistics)."""
    from evomerge.methods.registry import registered_methods

    return [m.name for m in registered_methods() if m.max_models is None and not m.statistics]


def _materialise(reference: str, out: Path) -> Path:
    """The model `base+adapter` stands for, written as a plain model folder."""
    import shutil

    from safetensors.torch import save_file

    from evomerge.io.adapters import open_checkpoint

    checkpoint = open_checkpoint(reference)
    shutil.copytree(checkpoint.path, out)
    for file in out.glob("*.safetensors"):
        file.unlink()
    save_file(
        {n: checkpoint.tensor(n).contiguous() for n in checkpoint.names}, out / "model.safetensors"
    )
    return out


@pytest.mark.parametrize(
    "method, base_listed",
    [(name, False) for name in _many_model_methods()]
    + [("linear", True), ("task_arithmetic", True), ("ties", True)],
)
def test_a_merge_of_several_adapters_reads_the_base_once(
    adapter_pool, method, base_listed, monkeypatch, tmp_path
):
    """Three `base+adapter` models and the base itself (as the recipe's base, and with
    `base_listed` among the models too): each base tensor is read once (it was read four or
    five times), and the merge is bit for bit the merge of the materialised models."""
    from collections import Counter

    import torch
    from safetensors.torch import load_file

    from evomerge.io.checkpoint import Checkpoint
    from evomerge.merging.executor import run_merge
    from evomerge.merging.recipe import parse_recipe

    base = adapter_pool["base"]
    adapters = [f"{base}+{adapter_pool[f'lora{i}']}" for i in range(3)]
    dtype = None if method == "task_arithmetic" else "float32"
    plain = [str(_materialise(ref, tmp_path / f"plain{i}")) for i, ref in enumerate(adapters)]
    others = [str(adapter_pool["ft0"])] + ([str(base)] if base_listed else [])
    run_merge(parse_recipe(_recipe(method, base, [*plain, *others], dtype)), tmp_path / "reference")

    reads: Counter = Counter()
    tensor = Checkpoint.tensor

    def counted(self, name):
        reads[(self.path.resolve(), name)] += 1
        return tensor(self, name)

    monkeypatch.setattr(Checkpoint, "tensor", counted)
    summary = run_merge(
        parse_recipe(_recipe(method, base, [*adapters, *others], dtype)),
        tmp_path / "merged",
    )
    base_reads = {name: n for (path, name), n in reads.items() if path == base.resolve()}
    names = Checkpoint(str(base)).names
    assert base_reads == dict.fromkeys(names, 1)
    ft0 = Checkpoint(str(adapter_pool["ft0"]))
    assert summary.bytes_read == Checkpoint(str(base)).total_bytes - _header(base) + (
        ft0.total_bytes - _header(adapter_pool["ft0"])
    )

    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert ours.keys() == reference.keys()
    for key in ours:
        assert ours[key].dtype == reference[key].dtype, key
        assert torch.equal(ours[key], reference[key]), key


def _header(folder: Path) -> int:
    """Bytes of a model's safetensors files that are not tensor data (header and its length)."""
    import json
    import struct

    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            json.loads(f.read(size))
        total += 8 + size
    return total


# --- the chat template: one function for both fitness backends ------------------------------

TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
NO_SYSTEM = (  # as Gemma's and Mistral's templates refuse a system message
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
HISTORIES = [
    ([{"role": "user", "content": "1+2="}], True),
    ([{"role": "system", "content": "be exact."}, {"role": "user", "content": "1+2="}], True),
    (
        [
            {"role": "system", "content": "be exact."},
            {"role": "user", "content": "1+1="},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "1+2="},
        ],
        True,
    ),
    ([{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}], False),
]


def _templated(tokenizer, template: str):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def _engineless_vllm_lm(tokenizer):
    """The "vllm" backend's LM without an engine (vLLM is not installed here): what builds and
    tokenises its prompts needs only the tokenizer."""
    from lm_eval.api.model import TemplateLM

    from evomerge.fitness.vllm_backend import VLLMLiveLM

    lm = VLLMLiveLM.__new__(VLLMLiveLM)
    TemplateLM.__init__(lm)
    lm.llm, lm.staging, lm.tokenizer = None, None, tokenizer
    lm._max_length, lm.max_gen_toks = 64, 16
    return lm


@pytest.mark.parametrize("template", [TEMPLATE, NO_SYSTEM], ids=["template", "no-system-role"])
def test_both_backends_apply_the_chat_template_as_lm_eval_s_hflm(template, small_pool_models):
    """One function (`prepared.apply_chat_template`) builds the templated prompts of both
    backends, and gives what lm-eval's own HFLM gives, its retry without the system message for
    a template that refuses one included."""
    from evomerge.fitness.backends import make_lm
    from evomerge.fitness.prepared import PromptFormat, apply_chat_template

    tokenizer = _templated(small_pool_models["tokenizer"], template)
    hf = make_lm("hf", small_pool_models["add"], tokenizer, batch_size=4, max_length=None)
    vllm = _engineless_vllm_lm(tokenizer)
    chat = PromptFormat(apply_chat_template=True)
    for lm in (hf, vllm):
        built = chat.request_kwargs(lm)["chat_template"]
        assert built.func is apply_chat_template and built.args == (lm.tokenizer,)
    for history, generation in HISTORIES:
        expected = hf.apply_chat_template(history, generation)  # lm-eval's HFLM's own method
        for lm in (hf, vllm):
            built = chat.request_kwargs(lm)["chat_template"]
            assert built(history, generation) == expected
        assert vllm.apply_chat_template(history, generation) == expected
        assert ("s:be exact." in expected) == (
            template == TEMPLATE and history[0]["role"] == "system"
        )


@pytest.mark.parametrize(
    "chat",
    [
        {"apply_chat_template": True},
        {"apply_chat_template": True, "system_instruction": "be exact."},
    ],
)
def test_the_vllm_backend_prepares_the_hf_backend_s_templated_requests(
    chat, small_pool, small_pool_models, tmp_path
):
    """The "vllm" backend's prepared requests (built without an engine) hold the same templated
    prompts, and the same context and continuation token ids, as the "hf" backend's."""
    from evomerge.fitness import FitnessConfig
    from evomerge.fitness.backends import make_lm
    from evomerge.fitness.prepared import HFPreparedRequests, PromptFormat
    from evomerge.fitness.tasks import build_task_set
    from evomerge.fitness.vllm_backend import VLLMPreparedRequests
    from evomerge.pool import load_manifest

    manifest = load_manifest(small_pool)
    config = FitnessConfig(
        tasks=manifest["tasks"], task_paths=[manifest["task_path"]], batch_size=16, **chat
    )
    prompt = PromptFormat.of(config)
    tokenizer = _templated(small_pool_models["tokenizer"], TEMPLATE)
    hf_lm = make_lm("hf", small_pool_models["add"], tokenizer, batch_size=16, max_length=None)
    hf = HFPreparedRequests(
        hf_lm, build_task_set(config, tmp_path / "hf").leaf_tasks, prompt=prompt
    )
    vllm = VLLMPreparedRequests(
        _engineless_vllm_lm(tokenizer),
        build_task_set(config, tmp_path / "vllm").leaf_tasks,
        prompt=prompt,
    )
    assert [i.args for i in vllm.instances] == [i.args for i in hf.instances]
    assert vllm.tokens == hf.tokens
    assert vllm.docs == hf.docs
    first = hf.instances[0].args[0]
    assert first.startswith("s:be exact. u:" if "system_instruction" in chat else "u:")
