"""Conversations -> token ids and labels, with the loss mask taken from the rendering itself.

A chat is rendered once in full by the tokenizer's chat template. For each assistant turn the same
template renders the conversation up to that turn with the generation prompt; that text must be a
prefix of the full rendering, and what follows it up to the reply's end-of-turn token is the reply:
exactly what the model has to generate at inference. The rendering is cut into prompt and reply
pieces at those character positions and each piece is tokenized on its own, so no token straddles
a boundary and no mask is built by counting tokens. A template that does not render consistently
raises :class:`SampleError`; the sample is reported, never trained with a silently zeroed loss.
"""

from __future__ import annotations

from dataclasses import dataclass

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
NAMED_TEMPLATES = {"vicuna_v1": VICUNA_V1}


def resolve_chat_template(name_or_jinja: str) -> str:
    """A template name known here (``vicuna_v1``) or Jinja text as it is."""
    if name_or_jinja in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name_or_jinja]
    if "{" not in name_or_jinja:
        raise ValueError(f"chat_template={name_or_jinja!r} is neither a known template "
                         f"({', '.join(NAMED_TEMPLATES)}) nor Jinja text")
    return name_or_jinja


class SampleError(ValueError):
    """A sample that cannot be trained on; ``problem`` names the kind for the preflight report."""

    def __init__(self, problem: str, message: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass
class Piece:
    text: str
    supervised: bool


def render_pieces(messages: list[dict], tokenizer, template: str) -> list[Piece]:
    """The conversation as text pieces, each a prompt part (no loss) or a reply part (loss)."""
    if template == "plain":
        return _plain_pieces(messages, tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    pieces, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt) or len(prompt) < cursor:
            raise SampleError("template_mismatch", f"the chat template renders the conversation up to turn {index} "
                                                   "differently from the whole conversation")
        end = _reply_end(full, len(prompt), message["content"], tokenizer, index)
        pieces += [Piece(full[cursor:len(prompt)], False), Piece(full[len(prompt):end], True)]
        cursor = end
    pieces.append(Piece(full[cursor:], False))
    return [p for p in pieces if p.text]


def _reply_end(full: str, start: int, content: str, tokenizer, index: int) -> int:
    """Where a reply ends: after its content and the end-of-turn token the template writes after it."""
    for text in (content, content.strip()):
        found = full.find(text, start)
        if found >= 0:
            break
    else:
        raise SampleError("template_mismatch", f"the chat template changed the text of assistant turn {index}")
    end = found + len(text)
    rest = full[end:]
    gap = len(rest) - len(rest.lstrip())
    for token in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        if token and rest[gap:].startswith(token):
            return end + gap + len(token)
    raise SampleError("template_mismatch", f"the chat template writes no end-of-turn token after assistant turn "
                                           f"{index}, so the model would never learn to stop")


def _plain_pieces(messages: list[dict], tokenizer) -> list[Piece]:
    """Stage 1 as LLaVA-1.5 does it: the image, then the caption and its end; the instruction is dropped."""
    users = [m for m in messages if m["role"] == "user"]
    replies = [m for m in messages if m["role"] == "assistant"]
    if len(users) != 1 or len(replies) != 1:
        raise SampleError("bad_roles", "the plain template takes one human turn and one gpt turn")
    image_tags = "<image>" * users[0]["content"].count("<image>")
    return [Piece((tokenizer.bos_token or "") + image_tags + "\n", False),
            Piece(replies[0]["content"] + tokenizer.eos_token, True)]


def encode(messages: list[dict], tokenizer, template: str, image_token: str, tokens_per_image: int,
           max_length: int, on_too_long: str = "skip") -> tuple[list[int], list[int]]:
    """Token ids with each image token expanded to ``tokens_per_image`` slots, and labels (-100: no loss).

    ``max_length`` counts the visual tokens. Too long: ``skip``/``error`` raise; ``truncate`` cuts at the
    right, never inside an image's run of slots, and raises when no supervised token would remain.
    """
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    ids: list[int] = []
    labels: list[int] = []
    for piece in render_pieces(messages, tokenizer, template):
        for token in tokenizer(piece.text, add_special_tokens=False)["input_ids"]:
            count = tokens_per_image if token == image_id else 1
            ids += [token] * count
            labels += [token if piece.supervised and token != image_id else -100] * count
    if len(ids) > max_length:
        if on_too_long != "truncate":
            raise SampleError("too_long", f"{len(ids)} tokens (visual tokens included) exceed max_length={max_length}")
        cut = max_length
        while cut > 0 and ids[cut - 1] == image_id and ids[cut] == image_id:
            cut -= 1  # back out of the image run entirely
        ids, labels = ids[:cut], labels[:cut]
    if not any(label != -100 for label in labels[1:]):
        raise SampleError("no_supervised_tokens", "no token of the sample would carry loss"
                          + (" after truncation" if on_too_long == "truncate" else ""))
    return ids, labels
