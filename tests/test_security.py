"""Security: nothing read from a model folder resolves outside it; what evomerge writes or
says does not leak what it should not (storage passwords, this machine's paths, permissions).

A merged model is made to be published, and everything evomerge reads from a source folder
(weights, index shards, config.json, generation_config.json, tokenizer files, adapter files) may
end up copied into it. A symlink or a `..` in a source folder that points at a file the user
never named (a token cache, an SSH key) must be refused with one sentence, exit 2, before
anything is written; the secret's bytes must appear nowhere.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_models import build_tiny_pool

SECRET = b"hf_secret_token_do_not_publish"


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    return build_tiny_pool(tmp_path_factory.mktemp("tiny"), n_models=2)


@pytest.fixture
def secret(tmp_path) -> Path:
    file = tmp_path / "outside" / "token"
    file.parent.mkdir()
    file.write_bytes(SECRET)
    return file


def merge(monkeypatch, capsys, work: Path, *models: Path) -> tuple[int, str, Path]:
    """`evomerge merge` of a linear recipe over `models`, in-process; (code, stderr, out)."""
    from evomerge.cli import main

    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = work / "out" / "model"
    monkeypatch.setattr(sys, "argv", ["evomerge", "merge", str(work / "recipe.yaml"), str(out)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err, out


def assert_refused(code: int, err: str, work: Path) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "outside its model folder" in lines[0], err
    assert "Traceback" not in err
    assert not (work / "out").exists(), "something was written"
    for path in work.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.name != "token":
            assert SECRET not in path.read_bytes(), f"{path} holds the secret"


def evil_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "special_tokens_map.json", "generation_config.json"]
)
def test_a_symlinked_metadata_file_is_refused(monkeypatch, capsys, tmp_path, pool, secret, name):
    evil = evil_copy(pool["ft1"], tmp_path / "evil")
    (evil / name).unlink(missing_ok=True)
    os.symlink(secret, evil / name)
    code, err, _ = merge(monkeypatch, capsys, tmp_path, evil, pool["ft0"])
    assert_refused(code, err, tmp_path)


def test_a_symlinked_weight_file_is_refused(monkeypatch, capsys, tmp_path, pool, secret):
    other = evil_copy(pool["ft0"], tmp_path / "other")
    evil = evil_copy(pool["ft1"], tmp_path / "evil")
    (evil / "model.safetensors").unlink()
    os.symlink(other / "model.safetensors", evil / "model.safetensors")
    code, err, _ = merge(monkeypatch, capsys, tmp_path, evil, pool["ft0"])
    assert_refused(code, err, tmp_path)


def test_an_index_naming_a_shard_outside_the_folder_is_refused(
    monkeypatch, capsys, tmp_path, pool, secret
):
    other = evil_copy(pool["ft0"], tmp_path / "other")
    evil = evil_copy(pool["ft1"], tmp_path / "evil")
    (evil / "model.safetensors").unlink()
    from safetensors import safe_open

    with safe_open(str(other / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    index = {"metadata": {}, "weight_map": {n: "../other/model.safetensors" for n in names}}
    (evil / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err, _ = merge(monkeypatch, capsys, tmp_path, evil, pool["ft0"])
    assert_refused(code, err, tmp_path)


def test_a_symlink_that_stays_inside_the_folder_is_followed(monkeypatch, capsys, tmp_path, pool):
    """Links within the folder are how some caches lay models out: they still merge."""
    linked = evil_copy(pool["ft1"], tmp_path / "linked")
    (linked / "blobs").mkdir()
    (linked / "config.json").rename(linked / "blobs" / "config")
    os.symlink(Path("blobs") / "config", linked / "config.json")
    code, err, out = merge(monkeypatch, capsys, tmp_path, linked, pool["ft0"])
    assert code == 0, err
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()


def test_a_symlinked_adapter_config_is_refused(tmp_path, secret):
    from evomerge.errors import UserError
    from evomerge.io.adapters import _adapter_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    os.symlink(secret, adapter / "adapter_config.json")
    with pytest.raises(UserError, match="outside its model folder"):
        _adapter_config(adapter)


def test_an_output_folder_follows_the_umask(monkeypatch, capsys, tmp_path, pool):
    """mkdtemp makes 0700 folders; a merged model is meant to be shared like any mkdir."""
    old = os.umask(0o022)
    try:
        code, err, out = merge(monkeypatch, capsys, tmp_path, pool["ft0"], pool["ft1"])
    finally:
        os.umask(old)
    assert code == 0, err
    assert out.stat().st_mode & 0o777 == 0o755


def test_a_storage_password_never_reaches_a_message():
    from evomerge.errors import UserError
    from evomerge.search.study import masked, open_storage

    url = "postgresql://alice:s3cr3t-pw@127.0.0.1:9/nodb"
    assert masked(url) == "postgresql://alice:***@127.0.0.1:9/nodb"
    assert masked("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"
    with pytest.raises(UserError) as caught:
        open_storage(url)
    assert "s3cr3t-pw" not in str(caught.value) and "alice:***@" in str(caught.value)


def test_a_model_card_names_models_not_local_paths(tmp_path):
    from types import SimpleNamespace

    from evomerge.results.export import model_card

    base, adapter = tmp_path / "models" / "base", tmp_path / "adapters" / "math"
    base.mkdir(parents=True), adapter.mkdir(parents=True)
    config = SimpleNamespace(
        pool=SimpleNamespace(
            base=str(base), models={"math": f"{base}+{adapter}", "hub": "org/model"}
        ),
        search=SimpleNamespace(sampler="gp", seed=0, merge_seed=0),
    )
    stages = [SimpleNamespace(recipe=SimpleNamespace(merge_method="ties"))]
    scores = {"unavailable": "no held-out split"}
    card = model_card(stages, SimpleNamespace(number=3), config, tmp_path / "run", scores)
    assert str(tmp_path) not in card
    assert "`math`: base+math" in card and "`hub`: org/model" in card
    assert "Run folder: run" in card and "](0" not in card
