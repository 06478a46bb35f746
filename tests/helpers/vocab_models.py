"""Tiny Llama checkpoints with real (BPE) tokenizers whose vocabularies differ the ways real
fine-tunes' do: an added pad (32000 vs 32001), added chat tokens with a changed eos, rows padded
beyond the tokenizer (152064 vs 151665), a pad the embeddings never got (tokenizer > vocab_size),
tied embeddings. Built offline in well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = [("t", "h"), ("h", "e"), ("th", "e"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n")]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
OTHER_TEMPLATE = "{% for message in messages %}{{ message['content'] }}</s>{% endfor %}"

CONFIG = dict(
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


def base_tokens() -> list[str]:
    """The base vocabulary in id order: 3 specials, 26 letters, space marker, merges."""
    return ["<unk>", "<s>", "</s>"] + list(LETTERS) + ["Ġ"] + ["".join(m) for m in MERGES]


def save_tokenizer(
    folder: Path,
    *,
    extra: list[str] = (),
    special: list[str] = (),
    eos: str = "</s>",
    template: str | None = None,
) -> None:
    """A BPE tokenizer over `base_tokens()` plus added tokens (ordinary `extra`, then `special`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(base_tokens())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    if extra:
        fast.add_tokens(list(extra))
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    if eos != "</s>":
        fast.eos_token = eos
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(folder))


def save_model(
    folder: Path,
    rows: int,
    *,
    seed: int,
    base_state: dict | None = None,
    shared: int = 0,
    tied: bool = False,
    eos_token_id: int = 2,
) -> dict:
    """A tiny Llama with `rows` embedding rows; the first `shared` rows and every other tensor
    are `base_state`'s plus small noise (a fine-tune), the rest random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **CONFIG,
        vocab_size=rows,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if base_state is not None:
        gen = torch.Generator().manual_seed(seed)
        state = model.state_dict()
        for name, tensor in state.items():
            src = base_state.get(name)
            if src is None:
                continue
            noise = torch.randn(src.shape, generator=gen) * 0.02
            if src.shape == tensor.shape:
                state[name] = src + noise
            else:  # a vocabulary tensor: shared rows fine-tuned, new rows as initialised
                n = min(shared, src.shape[0], tensor.shape[0])
                tensor = tensor.clone()
                tensor[:n] = src[:n] + noise[:n]
                state[name] = tensor
        model.load_state_dict(state, strict=False)
        if tied:
            model.tie_weights()
    model.save_pretrained(str(folder), safe_serialization=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def build_vocab_pool(root: Path, *, tied: bool = False) -> dict[str, Path]:
    """base (40 tokens), pad (+<pad>: 41), chat (+<|im_start|>, <|im_end|> as eos: 42, config
    eos_token_id changed), padded (40 tokens, 48 rows), unused (41 tokens in the tokenizer, 40
    rows), other (+ two ordinary tokens, `xyz` and `qq`)."""
    root = Path(root)
    n = len(base_tokens())
    folders = {k: root / k for k in ("base", "pad", "chat", "padded", "unused", "other")}
    save_tokenizer(folders["base"], template=OTHER_TEMPLATE)
    base = save_model(folders["base"], n, seed=0, tied=tied)
    save_tokenizer(folders["pad"], extra=[], special=["<pad>"], template=OTHER_TEMPLATE)
    save_model(folders["pad"], n + 1, seed=1, base_state=base, shared=n, tied=tied)
    save_tokenizer(
        folders["chat"], special=["<|im_start|>", "<|im_end|>"], eos="<|im_end|>", template=CHATML
    )
    save_model(
        folders["chat"], n + 2, seed=2, base_state=base, shared=n, tied=tied, eos_token_id=n + 1
    )
    save_tokenizer(folders["padded"], template=CHATML)
    save_model(folders["padded"], n + 8, seed=3, base_state=base, shared=n, tied=tied)
    save_tokenizer(folders["unused"], special=["<pad>"], template=OTHER_TEMPLATE)
    save_model(folders["unused"], n, seed=4, base_state=base, shared=n, tied=tied)
    save_tokenizer(folders["other"], extra=["xyz", "qq"])
    save_model(folders["other"], n + 2, seed=5, base_state=base, shared=n, tied=tied)
    return folders


def vocab_of(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def config_of(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
