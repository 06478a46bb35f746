"""`evomerge check`: what a merge or a search would meet, before anything is merged.

From headers and configs only (safetensors headers, config.json, the tokenizer files; an
adapter's small factor file, to check that it fits its base): that the sources are one
architecture with the same tensor shapes, their vocabularies and how they will be aligned,
tied embeddings, layer counts and the config keys that hold them, chat templates and stop
tokens, adapters and their bases, and the dtype of every source. One `Finding` per line; a
`block` finding is one the merge (or the search) would refuse.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import UserError

if TYPE_CHECKING:
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.merging.recipe import Recipe

LOG = logging.getLogger(__name__)

LEVELS = ("ok", "info", "warn", "block")


@dataclass(frozen=True)
class Finding:
    level: str  # ok | info | warn | block
    topic: str
    message: str

    def line(self) -> str:
        return f"{self.level.upper():<5} {self.topic}: {self.message}"


def blocked(findings: list[Finding]) -> bool:
    return any(f.level == "block" for f in findings)


# --- entry point ---------------------------------------------------------------------------
def check_path(path: Path) -> list[Finding]:
    """Findings for a recipe file (one or several stages)."""
    from evomerge.merging.multistage import load_stages

    try:
        stages = load_stages(Path(path))
    except UserError as exc:
        return [Finding("block", "recipe", str(exc))]
    names = {s.name for s in stages if s.name}
    findings = []
    for stage in stages:
        found = check_recipe(stage.recipe, stages=names)
        prefix = f"[{stage.name or 'final'}] " if len(stages) > 1 else ""
        findings += [Finding(f.level, prefix + f.topic, f.message) for f in found]
    return findings


def is_search_config(path: Path) -> bool:
    """True for a search config (a mapping with a `pool`), False for a recipe."""
    import yaml

    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return len(documents) == 1 and isinstance(documents[0], dict) and "pool" in documents[0]


def raw_pool(path: Path) -> tuple[str, list[str]] | None:
    """(base, models) of a search config's `pool`, folders resolved against the config's
    folder, read without validating the rest of the config; None where it has no such pool."""
    import yaml

    try:
        pool = yaml.safe_load(Path(path).read_text()).get("pool") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    base, models = pool.get("base"), pool.get("models")
    if isinstance(models, dict):
        models = list(models.values())
    if not isinstance(base, str) or not isinstance(models, list):
        return None
    here = Path(path).resolve().parent

    def local(ref: str) -> str:
        return "+".join(str(here / Path(p).expanduser()) for p in str(ref).split("+"))

    return local(base), [local(m) for m in models]


def check_pool(base: str, models: list[str], vocabulary: dict | None = None) -> list[Finding]:
    """A search's pool (its base and models), as a `models:` merge over all of them meets them;
    `vocabulary`: the recipe keys of the output tokenizer (`tokenizer_source` or `tokenizer`,
    without which differing vocabularies block, and `chat_template`)."""
    from evomerge.merging.recipe import InputModel, Recipe

    refs = [base] + [m for m in models if m != base]
    recipe = Recipe(
        merge_method="linear",
        models=[InputModel(model=m) for m in refs],
        parameters={"weight": 1.0},
        **(vocabulary or {}),
    )
    return check_recipe(recipe, search=True)


def pool_vocabulary_problem(refs: list[str]) -> str | None:
    """One sentence when the local model folders `refs` (a search pool) do not share one
    vocabulary (embedding rows or tokens), else None; folders that are not there are skipped
    (their own check says so)."""
    from evomerge.io.checkpoint import Checkpoint, reference_parts

    seen: dict[str, tuple] = {}
    for ref in refs:
        parts = reference_parts(ref)
        folder = Path(parts[0]).expanduser()
        if not folder.is_dir():
            continue
        try:
            ckpt = Checkpoint(str(folder))
        except UserError:
            continue
        tok_folder = Path(parts[-1]).expanduser()
        if not (tok_folder / "tokenizer.json").is_file():
            tok_folder = folder
        seen[ref] = (_rows(ckpt), _tokenizer_vocab(tok_folder))
    rows = {r for r, _ in seen.values()}
    tokens = {json.dumps(v, sort_keys=True) for _, v in seen.values() if v}
    if len(rows) > 1 or len(tokens) > 1:
        described = ", ".join(f"{r}: {n} rows" for r, (n, _) in seen.items())
        return (
            f"the pool's models have different vocabularies ({described}); set "
            "`pool.tokenizer_source: union` (or `base`, or a pool model's name) in the run "
            "config to align them as `evomerge merge` does"
        )
    return None


# --- recipes -------------------------------------------------------------------------------
def check_recipe(recipe: Recipe, *, stages: set[str] = frozenset(), search: bool = False):
    findings: list[Finding] = []
    refs = recipe.model_paths() + [
        m for m in recipe.tokenizer_models() if m not in recipe.model_paths()
    ]
    opened: dict[str, Checkpoint] = {}
    for ref in refs:
        if ref in stages:
            findings.append(Finding("info", "source", f"{ref}: an earlier stage's output"))
            continue
        ckpt, found = _open(ref)
        findings += found
        if ckpt is not None:
            opened[ref] = ckpt
    if stages.intersection(refs):
        findings.append(
            Finding(
                "info",
                "stage",
                "reads an earlier stage's output, which does not exist yet: its sources are "
                "compared when `evomerge merge` builds it",
            )
        )
        return findings
    inputs = {r: c for r, c in opened.items() if r in recipe.model_paths()}
    if len(inputs) < len([r for r in recipe.model_paths() if r not in stages]):
        return findings  # a source is missing or broken: said above, nothing more to compare
    if not inputs:
        return findings
    findings += _architecture(inputs)
    if blocked(findings):
        return findings
    findings += _shapes(inputs)
    findings += _tied(inputs)
    from evomerge.merging.plan import plan_merge

    plan, plan_error = None, None
    try:
        plan = plan_merge(recipe, checkpoints=inputs | opened)
    except UserError as exc:
        plan_error = str(exc)
    vocabulary = _vocabulary(recipe, inputs, plan, search=search)
    findings += vocabulary
    if blocked(vocabulary):  # the plan's refusal would only say it again
        plan_error = None
    findings += _layers(recipe, inputs, plan, plan_error)
    findings += _chat(recipe, inputs, plan)
    findings += _dtypes(recipe, inputs)
    return findings


def _open(ref: str) -> tuple[Checkpoint | None, list[Finding]]:
    from evomerge.io.adapters import open_checkpoint
    from evomerge.io.checkpoint import reference_parts

    parts = reference_parts(ref)
    for part in parts:
        if not Path(part).expanduser().is_dir():
            return None, [Finding("block", "source", f"{ref}: {part!r} is not a local folder")]
    try:
        ckpt = open_checkpoint(ref)
    except UserError as exc:
        return None, [Finding("block", "source", f"{ref}: {exc}")]
    config = ckpt.config
    arch = (config.get("architectures") or [config.get("model_type") or "unknown"])[0]
    rows = _rows(ckpt)
    tok = _tokenizer_vocab(_tok_folder(ckpt))
    what = f"{arch}, {ckpt.num_layers} layers"
    if rows is not None:
        what += f", {rows} embedding rows"
    what += f", tokenizer {len(tok)} tokens" if tok else ", no tokenizer.json"
    found = [Finding("info", "source", f"{ref}: {what}")]
    if len(parts) > 1:
        adapter = _json(Path(parts[1]).expanduser() / "adapter_config.json")
        recorded = adapter.get("base_model_name_or_path") or "not recorded"
        targets = adapter.get("target_modules")
        targets = ", ".join(targets) if isinstance(targets, list) else targets
        found.append(
            Finding(
                "info",
                "adapter",
                f"{ref}: LoRA r={adapter.get('r', 8)} on {targets}; trained on {recorded}, "
                f"applied to {parts[0]}",
            )
        )
    return ckpt, found


# --- architecture and shapes -----------------------------------------------------------------
def _architecture(inputs: dict[str, Checkpoint]) -> list[Finding]:
    from evomerge.io.checkpoint import check_compatible

    try:
        check_compatible(inputs, same_vocabulary=False)
    except UserError as exc:
        return [Finding("block", "architecture", str(exc))]
    first = next(iter(inputs.values())).config
    arch = (first.get("architectures") or [first.get("model_type") or "unknown"])[0]
    return [Finding("ok", "architecture", f"all {len(inputs)} sources are {arch}")]


def _shapes(inputs: dict[str, Checkpoint]) -> list[Finding]:
    """Every tensor name the sources share, compared by shape (rows of vocabulary tensors
    apart: those are the vocabulary's business)."""
    from evomerge.io.checkpoint import layer_index, with_layer_index
    from evomerge.merging.tokenizer import is_vocabulary_tensor

    (first_ref, first), *others = inputs.items()
    for ref, other in others:
        for name in first.names:
            probe = name
            if layer_index(name) is not None and name not in other:
                probe = with_layer_index(name, 0)
            if probe not in other or probe not in first:
                continue
            a, b = first.shape(probe), other.shape(probe)
            if is_vocabulary_tensor(probe):
                a, b = a[1:], b[1:]
            if a != b:
                return [
                    Finding(
                        "block",
                        "shapes",
                        f"{probe} is {list(first.shape(probe))} in {first_ref} and "
                        f"{list(other.shape(probe))} in {ref}",
                    )
                ]
    return [Finding("ok", "shapes", "every shared tensor has one shape across the sources")]


def _tied(inputs: dict[str, Checkpoint]) -> list[Finding]:
    found = []
    kinds = {}
    for ref, ckpt in inputs.items():
        head = any(n.endswith(("lm_head.weight", "embed_out.weight")) for n in ckpt.names)
        tied_config = ckpt.config.get("tie_word_embeddings")
        kinds[ref] = "untied" if head else "tied"
        if tied_config is True and head:
            found.append(
                Finding(
                    "warn",
                    "embeddings",
                    f"{ref}: config ties the embeddings but "
                    "the checkpoint has its own output head (it is ignored)",
                )
            )
        if tied_config is False and not head:
            found.append(
                Finding(
                    "block",
                    "embeddings",
                    f"{ref}: config says untied embeddings "
                    "but the checkpoint has no output head tensor",
                )
            )
    values = set(kinds.values())
    if len(values) == 1:
        found.append(Finding("ok", "embeddings", f"{values.pop()} in every source"))
    return found


# --- vocabulary -----------------------------------------------------------------------------
def _vocabulary(recipe: Recipe, inputs, plan, *, search: bool) -> list[Finding]:
    from evomerge.merging.tokenizer import config_vocab_size

    found = []
    vocabs = {}
    for ref, ckpt in inputs.items():
        rows = _rows(ckpt)
        vocab = _tokenizer_vocab(_tok_folder(ckpt))
        vocabs[ref] = vocab
        size = config_vocab_size(ckpt.config)
        if rows is not None and vocab:
            beyond = sorted((i, t) for t, i in vocab.items() if i >= rows)
            if beyond:
                names = ", ".join(repr(t) for _, t in beyond[:3])
                found.append(
                    Finding(
                        "warn",
                        "vocabulary",
                        f"{ref}: its tokenizer has "
                        f"{len(beyond)} token(s) beyond its {rows} rows ({names}): "
                        "no embedding; a vocabulary source drops them",
                    )
                )
            elif rows > len(vocab):
                found.append(
                    Finding(
                        "info",
                        "vocabulary",
                        f"{ref}: {rows} rows for {len(vocab)} tokens (padded beyond the tokenizer)",
                    )
                )
        if rows is not None and size is not None and size != rows:
            found.append(
                Finding(
                    "warn",
                    "vocabulary",
                    f"{ref}: config vocab_size {size} but {rows} embedding rows",
                )
            )
    rows = {ref: _rows(ckpt) for ref, ckpt in inputs.items()}
    same_rows = len(set(rows.values())) == 1
    known = [v for v in vocabs.values() if v]
    same_tokens = all(v == known[0] for v in known)
    source = recipe.vocabulary_source()
    if search and source is None and not (same_rows and same_tokens):
        found.append(
            Finding(
                "block",
                "vocabulary",
                "the pool's models have different vocabularies: set "
                "`pool.tokenizer_source: union` (or `base`, or a pool model's name) in the "
                "run config to align them",
            )
        )
        return found
    if source is None:
        if not same_rows:
            described = ", ".join(f"{r}: {n}" for r, n in rows.items())
            found.append(
                Finding(
                    "block",
                    "vocabulary",
                    f"different vocabulary sizes "
                    f"({described}); add `tokenizer_source: union` (or base, or a "
                    "model) to align them by token",
                )
            )
        elif not same_tokens:
            found.append(
                Finding(
                    "warn",
                    "vocabulary",
                    "the sources have the same number of rows "
                    "but different tokens: rows would be merged by id, not by "
                    "token; add `tokenizer_source: union` to align them",
                )
            )
        else:
            count = next(iter(rows.values()))
            found.append(
                Finding(
                    "ok",
                    "vocabulary",
                    f"one vocabulary ({count} rows) in every "
                    "source; the tokenizer is copied from "
                    f"{recipe.base_model or recipe.model_paths()[0]}",
                )
            )
        return found
    alignment = plan.vocabulary if plan is not None else None
    if alignment is None:
        from evomerge.merging.tokenizer import build_alignment

        try:
            alignment = build_alignment(recipe, inputs)
        except UserError as exc:
            found.append(Finding("block", "vocabulary", str(exc)))
            return found
        except Exception as exc:  # noqa: BLE001 (a tokenizer transformers cannot read)
            found.append(Finding("block", "vocabulary", f"cannot build the vocabulary: {exc}"))
            return found
    count = len(alignment.vocab)
    padded = f", padded to {alignment.size} rows" if alignment.size != count else ""
    found.append(
        Finding(
            "info",
            "vocabulary",
            f"aligned by token to `{source}`: {count} "
            f"tokens{padded}; vocab_size will be {alignment.size}",
        )
    )
    by_id = {i: t for t, i in alignment.vocab.items()}
    for ref in inputs:
        lacking = [by_id[i] for i, r in enumerate(alignment.rows[ref]) if r < 0]
        if lacking:
            names = ", ".join(repr(t) for t in lacking[:3]) + (", ..." if len(lacking) > 3 else "")
            found.append(
                Finding(
                    "info",
                    "vocabulary",
                    f"{ref} lacks {len(lacking)} of them "
                    f"({names}): filled from the models that have them",
                )
            )
        limit = _rows(inputs[ref])
        dropped = sum(
            1
            for t, i in (vocabs.get(ref) or {}).items()
            if (limit is None or i < limit) and t not in alignment.vocab
        )
        if dropped > 0:
            found.append(
                Finding(
                    "warn",
                    "vocabulary",
                    f"{ref}: {dropped} of its tokens are not "
                    "in the output vocabulary; their rows are dropped",
                )
            )
    return found


# --- layers ---------------------------------------------------------------------------------
def _layers(recipe: Recipe, inputs, plan, plan_error: str | None) -> list[Finding]:
    from evomerge.io.checkpoint import LAYER_COUNT_KEYS

    found = []
    described = []
    for ref, ckpt in inputs.items():
        keys = [k for k in LAYER_COUNT_KEYS if k in ckpt.config]
        described.append(f"{ref}: {ckpt.num_layers} ({', '.join(keys) or 'no config key'})")
    found.append(Finding("info", "layers", "; ".join(described)))
    if plan_error is not None:
        found.append(Finding("block", "plan", plan_error))
    elif plan is not None:
        source = inputs.get(plan.config_source)
        keys = [k for k in LAYER_COUNT_KEYS if source is not None and k in source.config]
        found.append(
            Finding(
                "ok",
                "layers",
                f"the output has {plan.num_layers} layers; "
                f"config.json key(s) set: {', '.join(keys) or 'none'} (from "
                f"{plan.config_source}); {len(plan.jobs)} tensors planned",
            )
        )
    return found


# --- chat templates and stop tokens -----------------------------------------------------------
def _chat(recipe: Recipe, inputs, plan) -> list[Finding]:
    from evomerge.merging.chat import (
        END_OF_TURN_TOKENS,
        NAMED_TEMPLATES,
        model_template,
        resolve_chat_template,
    )
    from evomerge.merging.tokenizer import tokenizer_folder

    found = []
    folders = {ref: tokenizer_folder(ckpt) for ref, ckpt in inputs.items()}
    templates = {ref: model_template(folder) for ref, folder in folders.items()}
    groups = Counter(t for t in templates.values() if t)
    if groups:
        labels = {t: f"template {chr(65 + i)}" for i, (t, _) in enumerate(groups.most_common())}
        described = "; ".join(
            f"{ref}: {labels[t] + _style(t) if t else 'none'}" for ref, t in templates.items()
        )
        found.append(Finding("info", "chat", f"{len(groups)} distinct template(s): {described}"))
    else:
        found.append(Finding("info", "chat", "no source has a chat template"))
    try:
        template = resolve_chat_template(recipe.chat_template, list(folders.values()))
    except (UserError, ValueError) as exc:
        return found + [Finding("block", "chat", str(exc))]
    if recipe.chat_template in NAMED_TEMPLATES:
        said = f"the bundled `{recipe.chat_template}` template"
    elif recipe.chat_template == "auto":
        said = "`auto`: " + ("the most common one" if template else "none found, none written")
    elif recipe.chat_template:
        said = "the recipe's own template"
    else:
        template = templates.get(plan.config_source if plan else next(iter(inputs)))
        said = "the tokenizer source's own"
    found.append(Finding("info", "chat", f"the output's template: {said}{_style(template)}"))
    # stop tokens
    eos = {}
    for ref, folder in folders.items():
        name = _special(folder, "eos_token")
        vocab = _tokenizer_vocab(folder)
        config_id = inputs[ref].config.get("eos_token_id")
        eos[ref] = name
        if name and vocab and config_id is not None:
            ids = config_id if isinstance(config_id, list) else [config_id]
            if vocab.get(name) not in ids:
                found.append(
                    Finding(
                        "warn",
                        "stop",
                        f"{ref}: config eos_token_id {config_id} "
                        f"is not its tokenizer's eos {name!r} ({vocab.get(name)})",
                    )
                )
    if len({e for e in eos.values() if e}) > 1:
        described = ", ".join(f"{r}: {e!r}" for r, e in eos.items())
        found.append(
            Finding(
                "warn",
                "stop",
                f"the sources end sequences differently "
                f"({described}); the output uses its tokenizer's",
            )
        )
    if plan is not None and plan.vocabulary is not None:
        out_vocab = plan.vocabulary.vocab
        out_eos = plan.vocabulary.tokenizer.eos_token
    else:
        source = folders.get(plan.config_source if plan else next(iter(inputs)))
        out_vocab = _tokenizer_vocab(source) if source else {}
        out_eos = _special(source, "eos_token") if source else None
    turns = [t for t in END_OF_TURN_TOKENS if template and t in template]
    missing = [t for t in turns if out_vocab and t not in out_vocab]
    if missing:
        found.append(
            Finding(
                "warn",
                "stop",
                f"the output's template ends turns with "
                f"{missing[0]!r}, which its vocabulary lacks: the model can never "
                "emit it",
            )
        )
    elif out_eos:
        stops = [out_eos] + [t for t in turns if t != out_eos]
        found.append(
            Finding(
                "ok",
                "stop",
                "the output stops at "
                + ", ".join(map(repr, stops))
                + " (config.json and generation_config.json say so)",
            )
        )
    return found


def _style(template: str | None) -> str:
    if not template:
        return ""
    for marker, name in (
        ("<|im_start|>", "ChatML"),
        ("<|start_header_id|>", "Llama 3"),
        ("[INST]", "Mistral"),
        ("### Instruction", "Alpaca"),
        ("[|endofturn|]", "EXAONE"),
        ("<start_of_turn>", "Gemma"),
    ):
        if marker in template:
            return f" ({name})"
    return ""


# --- dtypes ---------------------------------------------------------------------------------
def _dtypes(recipe: Recipe, inputs) -> list[Finding]:
    described = []
    codes = set()
    for ref, ckpt in inputs.items():
        counts = Counter(ckpt.dtype_name(n) for n in ckpt.names)
        codes.update(counts)
        described.append(f"{ref}: " + "/".join(c for c, _ in counts.most_common()))
    found = [Finding("info", "dtype", "; ".join(described))]
    if recipe.dtype:
        math = f"the recipe's dtype {recipe.dtype}"
    elif len(codes) > 1:
        math = "the promotion of " + ", ".join(sorted(codes))
    else:
        math = f"{next(iter(codes), 'unknown')} (the sources')"
    out = recipe.out_dtype or recipe.dtype or "the math dtype"
    found.append(Finding("info", "dtype", f"merged in {math}; written as {out}"))
    return found


# --- small readers ----------------------------------------------------------------------------
def _rows(ckpt: Checkpoint) -> int | None:
    from evomerge.merging.tokenizer import is_vocabulary_tensor

    for name in ckpt.names:
        if is_vocabulary_tensor(name) and ("embed" in name or name.endswith("wte.weight")):
            return ckpt.shape(name)[0]
    return None


def _tok_folder(ckpt: Checkpoint) -> Path:
    from evomerge.merging.tokenizer import tokenizer_folder

    return tokenizer_folder(ckpt)


def _tokenizer_vocab(folder: Path | None) -> dict[str, int]:
    from evomerge.merging.chat import output_vocab

    if folder is None:
        return {}
    try:
        return output_vocab(Path(folder))
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _special(folder: Path, name: str) -> str | None:
    value = _json(Path(folder) / "tokenizer_config.json").get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
