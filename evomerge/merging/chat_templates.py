"""The chat templates evomerge bundles, by mergekit 0.1.5's names (evomerge's own text of each,
rendering what mergekit's file of that name renders; `exaone` without the indentation mergekit's
leaves in its output), and the check of a recipe's `chat_template`. Plain data: the recipe reads
it when it validates (see evomerge/merging/chat.py for where templates are written)."""

from __future__ import annotations

import difflib

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is defined -%}"
    "{{- ' [INST] ' ~ system ~ '\\n\\n' ~ message['content'] ~ ' [/INST]' -}}"
    "{%- else -%}{{- ' [INST] ' ~ message['content'] ~ ' [/INST]' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' ~ message['content'] ~ eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}\n"
)

_ALPACA = (
    "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{{ (systems | last).content | trim if systems else '' }}\n\n"
    "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', "
    "'user_context': '### Input:'} %}"
    "{% for message in messages %}"
    "{% if message['role'] in headers %}"
    "{{ headers[message['role']] ~ '\\n' ~ (message['content'] | trim) }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '### Response:\\n' }}{% endif %}"
)

_EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}"
    "{% endif %}"
    "{{ '[|' ~ message['role'] ~ '|]' ~ message['content'] }}"
    "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

NAMED_TEMPLATES = {
    "alpaca": _ALPACA,
    "chatml": _CHATML,
    "exaone": _EXAONE,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
}

# Tokens that end an assistant turn in common templates: generation must stop at them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "[|endofturn|]", "<end_of_turn>", "<|end|>")


def check_chat_template(value: str | None) -> str | None:
    """Refuse a `chat_template` that is neither `auto`, a bundled name, nor a template (mergekit
    refuses it only when it writes the tokenizer, after the merge)."""
    if value is None or value == "auto" or value in NAMED_TEMPLATES:
        return value
    if len(value) < 20 or "{" not in value:
        names = ", ".join(sorted(NAMED_TEMPLATES))
        hint = difflib.get_close_matches(value, list(NAMED_TEMPLATES), n=1)
        suggestion = f"did you mean {hint[0]!r}?" if hint else f"the names are auto, {names}"
        raise ValueError(
            f"chat_template {value!r} is neither a bundled template nor Jinja text; {suggestion}"
        )
    return value
