"""The answering loop every evaluation shares: greedy answers a batch at a time, each image run once.

``python -m eval.vqa run`` and the demo's held-out score (``tools.demo.score``) both answer through
``generate_answers``; ``user_turn`` is the one user message a question is asked in, whatever stands for
the image (the processor's image token, or a panel's text twin for a bare LM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eval.formats import Question


def with_suffix(text: str, suffix: str) -> str:
    """Append the suffix's lines that the question does not already carry (LLaVA files often do)."""
    missing = [line for line in suffix.splitlines() if line not in text]
    return "\n".join([text, *missing]) if missing else text


def user_turn(image: str, prompt: str) -> list[dict[str, str]]:
    """The chat messages a question is asked in: ``image`` (a placeholder or its stand-in text), a newline,
    then the prompt."""
    return [{"role": "user", "content": f"{image}\n{prompt}"}]


def generate_answers(
    model: Any,
    processor: Any,
    questions: Sequence[Question],
    images_dir: Path,
    suffix: str,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[Sequence[Question], list[str], list[str]], None],
    desc: str = "answering",
) -> None:
    """Greedy answers, a batch at a time; ``on_batch(questions, prompts, replies)`` stores each batch.

    Questions are taken grouped by image (in order of first appearance), so a batch holds several
    questions per image and ``generate_shared`` runs each image and the shared prompt start once.
    Each prompt is the question with ``with_suffix(text, suffix)``; replies are stripped.
    """
    import torch
    from tqdm import tqdm

    from vlm.images import load_image

    first_seen: dict[str | None, int] = {}
    for q in questions:
        first_seen.setdefault(q.image, len(first_seen))
    ordered = sorted(questions, key=lambda q: first_seen[q.image])
    with tqdm(total=len(ordered), desc=desc, unit="q") as bar:
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            prompts = [with_suffix(q.text, suffix) for q in batch]
            texts = [processor.apply_chat_template(user_turn(processor.image_token, p)) for p in prompts]
            pictures = {name: load_image(images_dir / name) for name in dict.fromkeys(q.image for q in batch)}
            inputs = processor(images=[pictures[q.image] for q in batch], text=texts, return_tensors="pt").to(
                model.device
            )
            with torch.no_grad():
                new_tokens = model.generate_shared(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=processor.tokenizer.pad_token_id,
                )
            replies = [t.strip() for t in processor.batch_decode(new_tokens)]
            on_batch(batch, prompts, replies)
            bar.update(len(batch))
