"""Vocabularies that differ: mergekit 0.1.5's `tokenizer_source` and `tokenizer:` block.

When a recipe names a vocabulary source (`union`, `base` or a model), the output vocabulary is
built first and every input's embedding and head rows are re-laid out by token before the merge
method sees them, as mergekit's `PermutedVocabulary` does:

- `base`: the base model's tokenizer (the first model's where there is no base), without the
  tokens at or beyond its config's `vocab_size`; a model: that model's tokenizer as it is;
  `union`: the base's tokenizer plus every token any input has within its `vocab_size`
  (ordinary tokens first, then added tokens, in input order).
- `tokenizer.tokens` entries not in the vocabulary are added to it.
- A row a model lacks is filled for that model with a default: the configured source of the
  token (`tokens:`), else the row of the only model that has the token, else the base's row,
  else the mean of the rows of the models that have it (zeros where none has it). `force`
  uses the configured source even for models that have the token.
- `pad_to_multiple_of` rounds the row count up; the padding rows are each model's mean row.

The output tokenizer is saved with the merge and `vocab_size` set to the row count.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError
from evomerge.io.checkpoint import layer_index
from evomerge.merging.recipe import ModelTokenSource, Recipe, TokenEmbedding, ZeroSource

if TYPE_CHECKING:
    import torch

    from evomerge.io.checkpoint import Checkpoint

LOG = logging.getLogger(__name__)

# The tensors indexed by token id along their first axis, by the ends of their names.
_VOCAB_SUFFIXES = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "embed_in.weight",
    "embed_out.weight",
    "word_embeddings.weight",
)


def is_vocabulary_tensor(name: str) -> bool:
    """True for an embedding or output-head matrix: one row per token."""
    return layer_index(name) is None and name.endswith(_VOCAB_SUFFIXES)


def config_vocab_size(config: dict) -> int | None:
    """`vocab_size` from a config.json (or its `text_config`), where it is a whole number."""
    for cfg in (config, config.get("text_config") or {}):
        value = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def tokenizer_folder(ckpt: Checkpoint) -> Path:
    """Where a model's tokenizer lives: an adapter's own folder when it ships one."""
    adapter = getattr(ckpt, "adapter_path", None)
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").exists():
        return Path(adapter)
    return Path(ckpt.path)


def load_tokenizer(folder: Path):
    """A fast tokenizer from a local folder (no network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 (transformers raises many kinds; one sentence out)
        raise UserError(f"cannot load the tokenizer in {str(folder)!r}: {exc}") from None


@dataclass
class VocabularyAlignment:
    """The output vocabulary, and for each input model the row of each output token."""

    tokenizer: Any  # transformers.PreTrainedTokenizerBase, saved with the merge
    vocab: dict[str, int]  # output token -> output row
    size: int  # output rows: len(vocab) rounded up to pad_to_multiple_of
    rows: dict[str, list[int]]  # model -> for each output row below len(vocab): its row or -1
    original_vocabs: dict[str, dict[str, int]]
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)
    base_model: str | None = None

    def align(self, models: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each model's vocabulary tensor re-laid out by output token (see the module notes)."""
        import torch

        group: dict[str, torch.Tensor] = {}
        for model, tensor in zip(models, tensors):
            group.setdefault(model, tensor)
        order = list(group)
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        shape = tensors[0].shape[1:]
        count = len(self.vocab)
        rows = {m: torch.tensor(self.rows[m], dtype=torch.long) for m in order}
        forced = self._forced()
        missing = forced.clone()
        for m in order:
            missing |= rows[m] < 0
        defaults = {}
        by_id = {i: t for t, i in self.vocab.items()}
        for token_id in missing.nonzero().flatten().tolist():
            token = by_id[token_id]
            defaults[token_id] = self._default_row(token, token_id, order, group, rows, dtype)
        out = []
        result = {}
        for m in order:
            new = torch.zeros((self.size, *shape), dtype=dtype)
            have = (rows[m] >= 0) & ~forced
            index, own = self.kept_rows(m)
            new[index] = group[m][own].to(dtype)
            for token_id, row in defaults.items():
                if not bool(have[token_id]):
                    if row is None:
                        LOG.error("no embedding for token %r in model %s", by_id[token_id], m)
                    else:
                        new[token_id] = row
            if self.size > count:  # each padding row: the model's mean row
                new[count:] = torch.mean(new[:count], dim=0)
            result[m] = new
        for m in models:
            out.append(result[m])
        return out

    def kept_rows(self, model: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the output rows that take `model`'s own row, its row for each), both (K,) long:
        what `align` copies; every other output row is a default or padding for `model`."""
        import torch

        rows = torch.tensor(self.rows[model], dtype=torch.long)  # (len(vocab),)
        index = ((rows >= 0) & ~self._forced()).nonzero().flatten()
        return index, rows[index]

    def align_statistics(
        self, models: list[str], vectors: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each model's per-row statistics (a (rows,) vector over its own rows, e.g. RegMean's
        token frequencies) laid out as `align` lays out its rows: 0 at the rows `align` fills
        with a default or padding, since none of that model's data reached them."""
        import torch

        out = []
        for model, vector in zip(models, vectors):
            index, own = self.kept_rows(model)
            new = torch.zeros(self.size, dtype=vector.dtype, device=vector.device)  # (size,)
            new[index.to(vector.device)] = vector[own.to(vector.device)]
            out.append(new)
        return out

    def own_statistics(self, model: str, vector: torch.Tensor, rows: int) -> torch.Tensor:
        """The inverse of `align_statistics` for one model: per-row statistics over the output
        rows (`vector`, (size,)) back over the model's own `rows` rows, 0 at a row of its that
        no output row takes."""
        import torch

        index, own = self.kept_rows(model)
        new = torch.zeros(rows, dtype=vector.dtype, device=vector.device)  # (rows,)
        new[own.to(vector.device)] = vector[index.to(vector.device)]
        return new

    def _forced(self) -> torch.Tensor:
        """(len(vocab),) bool: the rows `tokenizer.tokens` takes from its source for every model
        (`force`)."""
        import torch

        forced = torch.zeros(len(self.vocab), dtype=torch.bool)
        for token, entry in self.tokens.items():
            if entry.force and token in self.vocab:
                forced[self.vocab[token]] = True
        return forced

    def _default_row(self, token, token_id, order, group, rows, dtype):
        import torch

        entry = self.tokens.get(token)
        present = [m for m in order if rows[m][token_id] >= 0]
        if entry is not None and entry.source is not None:
            source = entry.source
            if isinstance(source, ZeroSource):
                return torch.zeros(group[order[0]].shape[1:], dtype=dtype)
            model = source.model if isinstance(source, ModelTokenSource) else source
            if model not in group:
                raise UserError(
                    f"tokenizer.tokens[{token!r}] takes its embedding from {model!r}, "
                    "which is not an input of this merge"
                )
            if isinstance(source, ModelTokenSource):
                src = source.token_id
                if src is None:
                    src = self.original_vocabs.get(model, {}).get(source.token)
                    if src is None:
                        raise UserError(
                            f"tokenizer.tokens[{token!r}]: model {model!r} has no token "
                            f"{source.token!r}"
                        )
                if not 0 <= src < group[model].shape[0]:
                    raise UserError(
                        f"tokenizer.tokens[{token!r}]: token_id {src} is out of range for "
                        f"model {model!r} ({group[model].shape[0]} rows)"
                    )
                return group[model][src].to(dtype)
            if rows[model][token_id] < 0:
                raise UserError(
                    f"tokenizer.tokens[{token!r}] takes its embedding from {model!r}, "
                    "which does not have that token"
                )
            return group[model][rows[model][token_id]].to(dtype)
        if len(present) == 1:
            return group[present[0]][rows[present[0]][token_id]].to(dtype)
        if not present:
            LOG.warning("token %r is in no input model; its embedding is zero", token)
            return torch.zeros(group[order[0]].shape[1:], dtype=dtype)
        if self.base_model in present:
            return group[self.base_model][rows[self.base_model][token_id]].to(dtype)
        total = torch.zeros(group[order[0]].shape[1:], dtype=dtype)
        for m in present:
            total = total + group[m][rows[m][token_id]].to(dtype)
        return total / len(present)

    def save(self, folder: Path) -> None:
        """Write the output tokenizer's files into `folder`."""
        self.tokenizer.save_pretrained(str(folder))


def build_alignment(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> VocabularyAlignment:
    """The output vocabulary of `recipe` (which names a vocabulary source) and the row map of
    every input model."""
    source = recipe.vocabulary_source()
    settings = recipe.tokenizer
    models = recipe.model_paths()
    base = recipe.base_model or models[0]
    sizes = {m: config_vocab_size(checkpoints[m].config) for m in models}

    tokenizers = {base: stripped_tokenizer(tokenizer_folder(checkpoints[base]), sizes[base])}
    for model in models:
        if model == base:
            continue
        try:
            tokenizers[model] = load_tokenizer(tokenizer_folder(checkpoints[model]))
        except UserError as exc:  # as mergekit: assume the base's vocabulary
            LOG.warning("%s; assuming it is the same as %s's", exc, base)

    if source == "base":
        out = tokenizers[base]
    elif source == "union":
        out = union_tokenizer(tokenizers[base], tokenizers, sizes)
    else:
        folder = tokenizer_folder(checkpoints[source]) if source in checkpoints else Path(source)
        if not folder.is_dir():
            raise UserError(
                f"tokenizer source {source!r} is neither union, base nor a model folder"
            )
        out = load_tokenizer(folder)

    tokens = dict((settings.tokens or {}) if settings else {})
    existing = set(out.get_vocab())
    for token in tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)

    vocab = out.get_vocab()
    count = len(vocab)
    pad = settings.pad_to_multiple_of if settings else None
    size = -(-count // pad) * pad if pad else count
    rows = {}
    for model in models:
        model_vocab = tokenizers.get(model, tokenizers[base]).get_vocab()
        limit = sizes[model] or len(model_vocab)
        row = [-1] * count
        for token, new_id in vocab.items():
            old = model_vocab.get(token)
            if old is not None and old < limit:
                row[new_id] = old
        rows[model] = row
    return VocabularyAlignment(
        tokenizer=out,
        vocab=vocab,
        size=size,
        rows=rows,
        original_vocabs={m: t.get_vocab() for m, t in tokenizers.items()},
        tokens=tokens,
        base_model=recipe.base_model,
    )


def stripped_tokenizer(folder: Path, vocab_size: int | None):
    """The tokenizer in `folder` without the tokens at or beyond `vocab_size` (an added pad the
    embeddings never got a row for)."""
    import tokenizers

    tokenizer = load_tokenizer(folder)
    limit = vocab_size or len(tokenizer.get_vocab())
    unused = {tok for tok, idx in tokenizer.get_vocab().items() if idx >= limit}
    if not unused:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"the tokenizer in {str(folder)!r} has tokens beyond vocab_size {limit} "
            "and no fast version, so they cannot be removed"
        )
    spec = json.loads(tokenizer._tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise UserError(
            f"the tokenizer in {str(folder)!r} has tokens beyond vocab_size {limit}; only a BPE "
            f"tokenizer can have them removed, this one is {spec['model']['type']}"
        )
    spec["added_tokens"] = [e for e in spec["added_tokens"] if e["id"] < limit]
    for tok in unused:
        spec["model"]["vocab"].pop(tok, None)

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return tokenizer


def union_tokenizer(base_tok, tokenizers: dict[str, Any], sizes: dict[str, int | None]):
    """The base's tokenizer plus every other token the inputs have below their `vocab_size`:
    ordinary tokens first (as plain added tokens), then added tokens with their settings."""
    from transformers import AutoTokenizer

    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tok in tokenizers.items():
        limit = sizes.get(model) or tok.vocab_size
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for token, idx in tok.get_vocab().items():
            if idx >= limit:
                LOG.warning("token %r of %s is at or beyond its vocab_size", token, model)
                continue
            if token not in added_names:
                ordinary.setdefault(token, None)
        for idx, info in decoder.items():
            if idx >= limit:
                continue
            if info.content in added:
                if added[info.content] != info:
                    LOG.warning(
                        "token %r is added with different settings; using the first", info.content
                    )
                continue
            added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's tokenizer stays as it was
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True)
    base_vocab = base_tok.get_vocab()
    for token in ordinary:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out
