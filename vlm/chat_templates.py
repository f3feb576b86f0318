"""Chat templates known by name (``model.chat_template: vicuna_v1``), for checkpoints whose tokenizer has none.

The model layer sets them on the tokenizer; training renders conversations with whatever template that is.
"""

from __future__ import annotations

# LLaVA-1.5's conversation format: "SYSTEM USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:".
VICUNA_V1 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = \"A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions.\" -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{ bos_token + system + ' ' }}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
# ChatML without a default system turn: what a small LM trained here (the demo's) is given.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"vicuna_v1": VICUNA_V1, "chatml": CHATML}


def resolve_chat_template(name_or_jinja: str) -> str:
    """A template name known here (``vicuna_v1``, ``chatml``) or Jinja text as it is."""
    if name_or_jinja in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name_or_jinja]
    if "{" not in name_or_jinja:
        raise ValueError(f"chat_template={name_or_jinja!r} is neither a known template "
                         f"({', '.join(NAMED_TEMPLATES)}) nor Jinja text")
    return name_or_jinja
