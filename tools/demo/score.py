"""Per-category accuracy of a VLM on a synth folder's ``questions.jsonl`` (greedy short answers).

The categories the demo is held to: lamp state, damage present/absent (any damage question, judged
on "none" vs a type), damage type (the damage questions whose answer is a type, exact), asset code
(exact), recommended action (exact), gauge (within +/-5); warning and severity are reported too. And
``asset_code_chat``: the code asked for as a user asks (``CHAT_CODE_PROMPT``, no answer format), right
when the reply, a sentence as a rule, holds the panel's code.
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
    if category == "asset_code_chat":
        found = ASSET_CODE.search(predicted)
        return {"asset_code_chat": found is not None and found.group() == gold}
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
    """The bare LM's greedy short answers with each panel's true text twin (``tools.demo.twin``) where the
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


def score(model, processor, data_dir: str | Path, limit: int | None = None, desc: str = "eval",
          answers_file: str | Path | None = None, twins: dict[str, str] | None = None) -> dict[str, float]:
    """Accuracy per category (fractions), plus ``n_<category>`` counts; answers optionally written as JSONL.
    Each scored panel is also asked ``CHAT_CODE_PROMPT``, after its own questions: a batch then still
    runs each image once.

    With ``twins``, ``model`` is a bare LM, ``processor`` its tokenizer, and the panels' twins stand
    for the images (``answer_from_twins``).
    """
    data_dir = Path(data_dir)
    questions = [json.loads(line) for line in (data_dir / "questions.jsonl").read_text().splitlines() if line]
    questions = questions[:limit] if limit else questions
    codes = {m["image"]: m["report"]["asset_code"] for m in panel_metas(data_dir)}
    by_panel: dict[str, list[dict]] = {}
    for question in questions:
        by_panel.setdefault(question["image"], []).append(question)
    questions = [asked for image, own in by_panel.items() for asked in [*own, {
        "question_id": f"{Path(image).stem}_asset_code_chat", "image": image, "text": CHAT_CODE_PROMPT,
        "answer": codes[image], "category": "asset_code_chat"}]]
    model.eval()
    # 16 new tokens: "The asset tag reads KX-4821." takes 13 and the end of turn.
    if twins is None:
        answers = answer_questions(model, processor, questions, data_dir, max_new_tokens=16, desc=desc)
    else:
        answers = answer_from_twins(model, processor, questions, twins, max_new_tokens=16, desc=desc)
    hits: dict[str, list[bool]] = {}
    for question, answer in zip(questions, answers, strict=True):
        for category, right in judge(question["category"], question["answer"], answer).items():
            hits.setdefault(category, []).append(right)
    if answers_file is not None:
        Path(answers_file).write_text("".join(json.dumps({**q, "predicted": a}) + "\n"
                                              for q, a in zip(questions, answers, strict=True)))
    result = {category: sum(h) / len(h) for category, h in sorted(hits.items())}
    result.update({f"n_{category}": len(h) for category, h in sorted(hits.items())})
    return result
