"""Per-category accuracy of a VLM on a synth folder's ``questions.jsonl`` (greedy short answers).

The categories the demo is held to: lamp state, damage present/absent (any damage question, judged
on "none" vs a type), damage type (the damage questions whose answer is a type, exact), asset code
(exact), recommended action (exact), gauge (within +/-5); warning and severity are reported too. And
the code as a user asks for it (``CHAT_CODE_PROMPT``, no answer format asked): whether the reply, a
sentence as a rule, carries the panel's code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

# The question of the demo's acceptance check (``chat.py --prompt``); the synth questions ask it this way too.
CHAT_CODE_PROMPT = "What is the asset code?"
ASSET_CODE = re.compile(r"\b[A-Z]{2}-\d{4}\b")  # vlm.synth's format: two letters, dash, four digits


def normalize(text: str) -> str:
    return " ".join(text.strip().strip(".").lower().split())


def judge(category: str, gold: str, predicted: str) -> dict[str, bool]:
    """The demo categories a single answer counts toward, and whether it is right in each."""
    gold_n, pred_n = normalize(gold), normalize(predicted)
    if category == "gauge":
        number = re.search(r"-?\d+", pred_n)
        return {"gauge_within_5": number is not None and abs(int(number.group()) - int(gold_n)) <= 5,
                "gauge_exact": pred_n == gold_n}
    if category == "damage":
        out = {"damage_present": (pred_n == "none") == (gold_n == "none")}
        if gold_n != "none":
            out["damage_type"] = pred_n == gold_n
        return out
    if category == "asset_code":
        return {"asset_code": predicted.strip().strip(".").upper() == gold.upper()}
    return {category: pred_n == gold_n}


@torch.no_grad()
def answer_questions(model, processor, questions: list[dict], image_folder: Path, batch_size: int = 56,
                     max_new_tokens: int = 12, desc: str = "eval") -> list[str]:
    """Greedy short answers in ``questions``' order; a synth folder lists each panel's questions together,
    so a batch shares its images (``generate_shared``)."""
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, unit="batch"):
        batch = questions[start:start + batch_size]
        prompts = [processor.apply_chat_template([{"role": "user", "content": "<image>\n" + q["text"]}])
                   for q in batch]
        inputs = processor(images=[image_folder / q["image"] for q in batch], text=prompts, return_tensors="pt")
        new_tokens = model.generate_shared(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=processor.tokenizer.pad_token_id)
        answers += processor.batch_decode(new_tokens)
    return answers


@torch.no_grad()
def answer_from_twins(language_model, tokenizer, questions: list[dict], twins: dict[str, str], batch_size: int = 100,
                      max_new_tokens: int = 12, desc: str = "eval from twins") -> list[str]:
    """The bare LM's greedy short answers with each panel's true text twin (``vlm.demo.twin``) where the
    image goes: what it could answer if the projector wrote every twin token exactly."""
    tokenizer.padding_side = "left"
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, unit="batch"):
        batch = questions[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": twins[q["image"]] + "\n" + q["text"]}],
                                                 tokenize=False, add_generation_prompt=True) for q in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = language_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def panel_metas(data_dir: str | Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` records of a synth folder's ``meta.jsonl`` (truth, report, camera), in order."""
    lines = (Path(data_dir) / "meta.jsonl").read_text().splitlines()[:limit]
    return [json.loads(line) for line in lines if line]


def written_codes(model, processor, data_dir: str | Path, prompt: str = CHAT_CODE_PROMPT,
                  find: re.Pattern = ASSET_CODE, limit: int | None = None, twins: dict[str, str] | None = None,
                  max_new_tokens: int = 16, desc: str = "codes in replies") -> float:
    """Share of the first ``limit`` panels of ``data_dir`` whose greedy reply to ``prompt`` holds the panel's
    asset code as the first match of ``find`` (its group 1 if it has one). ``twins``: as for ``score``."""
    metas = panel_metas(data_dir, limit)
    prompts = [{"image": m["image"], "text": prompt} for m in metas]
    if twins is None:
        replies = answer_questions(model, processor, prompts, Path(data_dir), max_new_tokens=max_new_tokens, desc=desc)
    else:
        replies = answer_from_twins(model, processor, prompts, twins, max_new_tokens=max_new_tokens, desc=desc)
    group = 1 if find.groups else 0
    found = [find.search(reply) for reply in replies]
    return sum(f is not None and f.group(group) == m["report"]["asset_code"]
               for f, m in zip(found, metas, strict=True)) / len(metas)


def score(model, processor, data_dir: str | Path, limit: int | None = None, desc: str = "eval",
          answers_file: str | Path | None = None, twins: dict[str, str] | None = None) -> dict[str, float]:
    """Accuracy per category (fractions), plus ``n_<category>`` counts; answers optionally written as JSONL.
    ``asset_code_chat``: ``written_codes`` on the panels of the scored questions.

    With ``twins``, ``model`` is a bare LM, ``processor`` its tokenizer, and the panels' twins stand
    for the images (``answer_from_twins``).
    """
    data_dir = Path(data_dir)
    questions = [json.loads(line) for line in (data_dir / "questions.jsonl").read_text().splitlines() if line]
    questions = questions[:limit] if limit else questions
    model.eval()
    if twins is None:
        answers = answer_questions(model, processor, questions, data_dir, desc=desc)
    else:
        answers = answer_from_twins(model, processor, questions, twins, desc=desc)
    hits: dict[str, list[bool]] = {}
    for question, answer in zip(questions, answers, strict=True):
        for category, right in judge(question["category"], question["answer"], answer).items():
            hits.setdefault(category, []).append(right)
    if answers_file is not None:
        Path(answers_file).write_text("".join(json.dumps({**q, "predicted": a}) + "\n"
                                              for q, a in zip(questions, answers, strict=True)))
    result = {category: sum(h) / len(h) for category, h in sorted(hits.items())}
    result.update({f"n_{category}": len(h) for category, h in sorted(hits.items())})
    panels = len({q["image"] for q in questions})  # a folder lists each panel's questions together
    result["asset_code_chat"] = written_codes(model, processor, data_dir, limit=panels, twins=twins,
                                              desc=f"{desc}: code in chat")
    result["n_asset_code_chat"] = panels
    return result
