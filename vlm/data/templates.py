"""Conversations -> token ids and labels, with the loss mask taken from the rendering itself.

A chat is rendered once in full by the tokenizer's chat template. For each assistant turn the same
template renders the conversation up to that turn with the generation prompt; that text must be a
prefix of the full rendering, and what follows it up to the reply's end-of-turn token is the reply:
exactly what the model has to generate at inference. The whole rendering is tokenized as LLaVA does
(split at ``<image>`` only: :func:`vlm.processor.tokenize_with_images`), so the ids are LLaVA's for a
legacy and a non-legacy Llama tokenizer alike, and a token carries loss when its characters overlap a
reply: a token straddling the prompt/reply boundary (" yes" after "ASSISTANT:") is the reply's first, as
in LLaVA. No mask is built by counting tokens. A template that does not render consistently raises
:class:`SampleError`; the sample is reported, never trained with a silently zeroed loss.
As in LLaVA, each turn's ``<image>`` first moves to the front of that turn (:func:`images_first`).
"""

from __future__ import annotations

from vlm.processor import tokenize_with_images

IGNORE = -100  # the label of a position that carries no loss


class SampleError(ValueError):
    """A sample that cannot be trained on; ``problem`` names the kind for the preflight report."""

    def __init__(self, problem: str, message: str) -> None:
        super().__init__(message)
        self.problem = problem


Span = tuple[int, int]  # [start, end) in characters


def render(messages: list[dict], tokenizer, template: str, image_token: str = "<image>") -> tuple[str, list[Span]]:
    """The conversation as one text and the spans of its replies (each with its end-of-turn token): the loss."""
    if template == "plain":
        return _plain(messages, image_token)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    replies, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt) or len(prompt) < cursor:
            raise SampleError("template_mismatch", f"the chat template renders the conversation up to turn {index} "
                                                   "differently from the whole conversation")
        cursor = _reply_end(full, len(prompt), message["content"], tokenizer, index)
        replies.append((len(prompt), cursor))
    return full, replies


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


def _plain(messages: list[dict], image_token: str) -> tuple[str, list[Span]]:
    """Stage 1 as LLaVA-1.5 does it (preprocess_plain): the image, then the caption and a newline; the
    instruction is dropped. BOS only where the tokenizer adds one itself, as LLaVA's tokenization does."""
    users = [m for m in messages if m["role"] == "user"]
    replies = [m for m in messages if m["role"] == "assistant"]
    if len(users) != 1 or len(replies) != 1:
        raise SampleError("bad_roles", "the plain template takes one human turn and one gpt turn")
    image_tags = image_token * users[0]["content"].count(image_token)
    text = image_tags + replies[0]["content"] + "\n"
    return text, [(len(image_tags), len(text))]


def images_first(messages: list[dict], image_token: str) -> list[dict]:
    """Each turn's image placeholders moved to its front, then a newline and the rest stripped, as LLaVA's
    preprocess_multimodal does ("Describe.\n<image>" -> "<image>\nDescribe.")."""
    moved = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str) and image_token in content:
            rest = content.replace(image_token, "").strip()
            content = (image_token * message["content"].count(image_token) + "\n" + rest).strip()
        moved.append({**message, "content": content})
    return moved


def tokenize(messages: list[dict], tokenizer, template: str, image_token: str,
             tokens_per_image: int | list[int]) -> tuple[list[int], list[int]]:
    """Token ids with each image token expanded to ``tokens_per_image`` slots, and labels (-100: no loss).

    A list gives each image, in order, its own count (towers that keep the aspect ratio, e.g. NaFlex).
    """
    counts = iter(tokens_per_image) if isinstance(tokens_per_image, list) else None
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    text, replies = render(images_first(messages, image_token), tokenizer, template, image_token)
    tokens, spans = tokenize_with_images(tokenizer, text, image_token, offsets=True)
    labels = _labels(tokens, spans, replies, image_id)
    ids, expanded, at = [], [], 0
    for _ in range(tokens.count(image_id)):  # each image's slots; the runs between images are copied whole
        place = tokens.index(image_id, at)
        count = next(counts) if counts is not None else tokens_per_image
        ids += tokens[at:place] + [image_id] * count
        expanded += labels[at:place] + [IGNORE] * count
        at = place + 1
    return ids + tokens[at:], expanded + labels[at:]


def _labels(tokens: list[int], spans: list[Span], replies: list[Span], image_id: int) -> list[int]:
    """Each token's label: itself where it overlaps a reply, else IGNORE. One sweep, as token starts and the
    replies both run left to right (a start that steps back restarts the replies: any order stays right)."""
    labels, at, previous = [], 0, 0
    for token, span in zip(tokens, spans, strict=True):
        if span[0] < previous:
            at = 0
        previous = span[0]
        while at < len(replies) and replies[at][1] <= span[0]:  # disjoint, in order: only the next can overlap
            at += 1
        keep = at < len(replies) and token != image_id and _overlaps(span, replies[at])
        labels.append(token if keep else IGNORE)
    return labels


def _overlaps(span: Span, reply: Span) -> bool:
    """A token shares characters with the reply; one of no width (a BOS it added) must lie strictly inside."""
    (start, end), (first, last) = span, reply
    return start < last and (end > first if end > start else start > first)


def fit(ids: list[int], labels: list[int], image_id: int, max_length: int,
        on_too_long: str = "skip") -> tuple[list[int], list[int]]:
    """The sample within ``max_length`` (visual tokens counted). Too long: ``skip``/``error`` raise;
    ``truncate`` cuts at the right as LLaVA does, but never into or past an image (the pictures would no
    longer match their slots) and never to zero loss: those raise."""
    truncated = len(ids) > max_length
    if truncated:
        if on_too_long != "truncate":
            raise SampleError("too_long", f"{len(ids)} tokens (visual tokens included) exceed max_length={max_length}")
        if image_id in ids[max_length:]:
            raise SampleError("too_long", f"{len(ids)} tokens exceed max_length={max_length} and truncating would "
                                          "cut an image")
        ids, labels = ids[:max_length], labels[:max_length]
    if labels[1:].count(IGNORE) == len(labels) - 1:  # the first label never counts: nothing predicts it
        raise SampleError("no_supervised_tokens", "no token of the sample would carry loss"
                          + (f" after truncation to max_length={max_length}" if truncated else ""))
    return ids, labels


def encode(messages: list[dict], tokenizer, template: str, image_token: str, tokens_per_image: int | list[int],
           max_length: int, on_too_long: str = "skip") -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation, within ``max_length`` (see :func:`tokenize`, :func:`fit`)."""
    ids, labels = tokenize(messages, tokenizer, template, image_token, tokens_per_image)
    return fit(ids, labels, tokenizer.convert_tokens_to_ids(image_token), max_length, on_too_long)
