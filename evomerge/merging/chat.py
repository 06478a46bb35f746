"""The output's tokenizer files, chat template and stop tokens.

`chat_template:` in a recipe is, as in mergekit 0.1.5, a template's Jinja text, `auto` (the
template most of the inputs share), or the name of a bundled template: `chatml`, `llama3`,
`mistral`, `alpaca`, `exaone` (evomerge's own text of each, rendering what mergekit's does).

A merged model must stop where its template ends a turn: the written `config.json` and
`generation_config.json` name the output tokenizer's end-of-sequence token (ids re-mapped when
the vocabulary was re-laid out), and `generation_config.eos_token_id` also lists the template's
end-of-turn token (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3) where the vocabulary has it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.merging.chat_templates import (
    END_OF_TURN_TOKENS,
    NAMED_TEMPLATES,
    check_chat_template,
)

if TYPE_CHECKING:
    from evomerge.merging.plan import MergePlan

LOG = logging.getLogger(__name__)


def _read(file: Path):
    """A JSON file's content; None where it is missing or not JSON (a copied file we only
    adjust: a broken one is left as it is)."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def model_template(folder: Path) -> str | None:
    """A model folder's chat template (chat_template.jinja, else tokenizer_config.json's, the
    `default` one of a list), stripped; None if it has none."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        text = jinja.read_text()
        return text.strip() or None
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = (_read(config) or {}).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):
        defaults = [t for t in template if isinstance(t, dict) and t.get("name") == "default"]
        template = defaults[0].get("template") if defaults else None
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_chat_template(value: str | None, folders: list[Path]) -> str | None:
    """The template text `chat_template:` asks for (None: keep the tokenizer's own)."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in map(model_template, folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    check_chat_template(value)
    return value


def search_chat_template(value: str | None, references: list[str]) -> str | None:
    """The `chat_template` every recipe of a search carries, for the pool's `chat_template`
    (`references`: the pool's base and models): `auto` chosen once, among the whole pool's
    templates (a recipe's own `auto` chooses among that recipe's inputs, which in a data-flow
    space change with the genome, and the live model holds one template), and written as the
    bundled name where it is one; a name or Jinja text as it is; None: the tokenizer's own."""
    from evomerge.io.checkpoint import reference_parts

    if value != "auto":
        return value
    folders = []
    for reference in references:  # an adapter's own tokenizer, else its base's
        parts = [Path(part) for part in reference_parts(reference)]
        own = (parts[-1] / "tokenizer_config.json").is_file()
        folders.append(parts[-1] if own else parts[0])
    text = resolve_chat_template("auto", folders)
    names = [name for name, known in NAMED_TEMPLATES.items() if known.strip() == text]
    return names[0] if names else text


def write_tokenizer_files(plan: MergePlan, staging: Path) -> None:
    """Tokenizer, chat template, vocab_size and stop tokens of the merged model in `staging`."""
    from evomerge.io.checkpoint import TOKENIZER_FILES, inside
    from evomerge.merging.tokenizer import tokenizer_folder

    recipe = plan.recipe
    folders = [tokenizer_folder(plan.checkpoints[m]) for m in recipe.model_paths()]
    template = resolve_chat_template(recipe.chat_template, folders)
    source = plan.checkpoints[plan.config_source]
    remap: dict[int, int | None] | None = None
    if plan.vocabulary is not None:
        tokenizer = plan.vocabulary.tokenizer
        if template:
            tokenizer.chat_template = template
        plan.vocabulary.save(staging)
        _set_config(staging / "config.json", {"vocab_size": plan.vocabulary.size})
        old = plan.vocabulary.original_vocabs.get(plan.config_source, {})
        remap = {i: plan.vocabulary.vocab.get(t) for t, i in old.items()}
    else:
        src = tokenizer_folder(source)
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                # copied as a plain file: a link could publish what it points to
                shutil.copy2(inside(src, name), staging / name)
        if template:
            (staging / "chat_template.jinja").write_text(template)
            config = staging / "tokenizer_config.json"
            if config.is_file():  # one template, not two that disagree
                data = _read(config)
                if isinstance(data, dict) and "chat_template" in data:
                    data.pop("chat_template")
                    config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    align_stop_tokens(staging, remap)


def output_vocab(folder: Path) -> dict[str, int]:
    """token -> id of the tokenizer written in `folder` (tokenizer.json; {} without one)."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return {}
    spec = _read(file)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        return {}
    vocab = spec.get("model", {}).get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs in id order
        vocab = {piece[0]: i for i, piece in enumerate(vocab)}
    vocab = dict(vocab)
    for entry in spec.get("added_tokens", []):
        vocab[entry["content"]] = entry["id"]
    return vocab


def _special(folder: Path, name: str) -> str | None:
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return None
    data = _read(file)
    value = data.get(name) if isinstance(data, dict) else None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def align_stop_tokens(folder: Path, remap: dict[int, int | None] | None) -> None:
    """Make config.json and generation_config.json name the written tokenizer's ids: ids of a
    re-laid-out vocabulary re-mapped, `eos_token_id` the tokenizer's end-of-sequence token, and
    the generation config's stop list extended by the chat template's end-of-turn token."""
    vocab = output_vocab(folder)
    if not vocab:
        return
    eos = _special(folder, "eos_token")
    eos_id = vocab.get(eos) if eos else None
    template = model_template(folder) or ""
    turn_ids = [vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab]
    generation = folder / "generation_config.json"
    if turn_ids and not generation.is_file() and (folder / "config.json").is_file():
        generation.write_text(json.dumps({"eos_token_id": eos_id}) + "\n")  # completed below
    for name in ("config.json", "generation_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        data = _read(file)
        if not isinstance(data, dict):
            continue
        changed = {}
        for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = data.get(key)
            if remap is not None and value is not None:
                ids = value if isinstance(value, list) else [value]
                mapped = [remap.get(i) for i in ids if isinstance(i, int)]
                mapped = [i for i in mapped if i is not None]
                new = mapped if isinstance(value, list) else (mapped[0] if mapped else None)
                if new != value:
                    changed[key] = new
                    value = new
        eos_ids = changed.get("eos_token_id", data.get("eos_token_id"))
        listed = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        if eos_id is not None and eos_id not in listed:
            LOG.info(
                "%s: eos_token_id %s is not the tokenizer's %r; set to %d",
                name,
                eos_ids,
                eos,
                eos_id,
            )
            listed = [eos_id] + [i for i in listed if i is not None]
            changed["eos_token_id"] = listed if isinstance(eos_ids, list) else eos_id
        if name == "generation_config.json":
            stops = changed.get("eos_token_id", data.get("eos_token_id"))
            stops = [i for i in (stops if isinstance(stops, list) else [stops]) if i is not None]
            extra = [i for i in turn_ids if i not in stops]
            if extra:
                changed["eos_token_id"] = stops + extra
        if changed:
            data.update(changed)
            file.write_text(json.dumps(data, indent=2) + "\n")


def _set_config(file: Path, values: dict) -> None:
    if not file.is_file():
        return
    data = _read(file)
    if not isinstance(data, dict):
        return
    data.update(values)
    file.write_text(json.dumps(data, indent=2) + "\n")
