"""Per-category accuracy of a VLM on a synth folder's ``questions.jsonl`` (greedy short answers).

The categories the demo is held to: lamp state, damage present/absent (any damage question, judged
on "none" vs a type), damage type (the damage questions whose answer is a type, exact), asset code
(exact), recommended action (exact), gauge (within +/-5); warning and severity are reported too. And
``asset_code_chat``: the code asked for as a user asks (``CHAT_CODE_PROMPT``, no answer format), right
when the reply, a sentence as a rule, holds the panel's code.

Questions are read, answered and judged as ``python -m eval.vqa run --benchmark panels`` does them:
``eval.formats`` reads the file, ``eval.answering.generate_answers`` answers, ``eval.scoring.judge_panel``
holds the rules; here they are only named as the demo's results name them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval.answering import generate_answers, user_turn
from eval.benchmarks import BENCHMARKS
from eval.formats import Question, load_benchmark
from eval.scoring import judge_panel

# The question of the demo's acceptance check (``chat.py --prompt``); the synth questions ask it this way too.
CHAT_CODE_PROMPT = "What is the asset code?"
# judge_panel's checks the demo reports under their own names; ``exact`` goes by the category's name,
# the gauge's as ``gauge_exact``, and none for damage (judged as present/absent and type instead).
CHECKS = ("gauge_within_5", "damage_present", "damage_type")
EXACT_NAMES = {"gauge": "gauge_exact", "damage": None}


def judge(category: str, gold: str, predicted: str) -> dict[str, bool]:
    """The demo categories a single answer counts toward, and whether it is right in each."""
    checks = judge_panel(category, gold, predicted)
    name = EXACT_NAMES.get(category, category)
    out = {name: checks["exact"] == 1.0} if name else {}
    return out | {check: checks[check] == 1.0 for check in CHECKS if check in checks}


@torch.no_grad()
def answer_from_twins(language_model, tokenizer, questions: Sequence[Question], twins: dict[str, str],
                      batch_size: int = 100, max_new_tokens: int = 12, desc: str = "eval from twins") -> list[str]:
    """The bare LM's greedy short answers with each panel's true text twin (``tools.demo.twin``) where the
    image goes: what it could answer if the projector wrote every twin token exactly."""
    tokenizer.padding_side = "left"
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, unit="batch"):
        batch = questions[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(user_turn(twins[q.image], q.text), tokenize=False,
                                                 add_generation_prompt=True) for q in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = language_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def panel_metas(data_dir: str | Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` records of a synth folder's ``meta.jsonl`` (truth, report, camera), in order."""
    lines = (Path(data_dir) / "meta.jsonl").read_text().splitlines()[:limit]
    return [json.loads(line) for line in lines if line]


def scored_questions(data_dir: Path, limit: int | None) -> list[Question]:
    """The folder's first ``limit`` questions, each panel's followed by ``CHAT_CODE_PROMPT`` about it."""
    questions = load_benchmark(BENCHMARKS["panels"], [data_dir / "questions.jsonl"])[0]
    questions = questions[:limit] if limit else questions
    codes = {m["image"]: m["report"]["asset_code"] for m in panel_metas(data_dir)}
    by_panel: dict[str, list[Question]] = {}
    for question in questions:
        by_panel.setdefault(question.image, []).append(question)
    asked = []
    for image, own in by_panel.items():
        key = f"{Path(image).stem}_asset_code_chat"
        asked += [*own, Question(key, key, CHAT_CODE_PROMPT, image, codes[image], {"category": "asset_code_chat"})]
    return asked


def score(model, processor, data_dir: str | Path, limit: int | None = None, desc: str = "eval",
          answers_file: str | Path | None = None, twins: dict[str, str] | None = None) -> dict[str, float]:
    """Accuracy per category (fractions), plus ``n_<category>`` counts; answers optionally written as JSONL.
    Each scored panel is also asked ``CHAT_CODE_PROMPT``, after its own questions: a batch then still
    runs each image once.

    With ``twins``, ``model`` is a bare LM, ``processor`` its tokenizer, and the panels' twins stand
    for the images (``answer_from_twins``).
    """
    data_dir = Path(data_dir)
    questions = scored_questions(data_dir, limit)
    model.eval()
    # 16 new tokens: "The asset tag reads KX-4821." takes 13 and the end of turn.
    if twins is None:
        replies: dict[str, str] = {}
        # No suffix: the synth questions carry their answer format, and the chat question must go without one.
        generate_answers(model, processor, questions, data_dir, "", 56, 16,
                         lambda batch, prompts, texts: replies.update(
                             (q.key, text) for q, text in zip(batch, texts, strict=True)), desc=desc)
        answers = [replies[q.key] for q in questions]
    else:
        answers = answer_from_twins(model, processor, questions, twins, max_new_tokens=16, desc=desc)
    hits: dict[str, list[bool]] = {}
    for question, answer in zip(questions, answers, strict=True):
        for category, right in judge(question.categories["category"], question.gold, answer).items():
            hits.setdefault(category, []).append(right)
    if answers_file is not None:
        Path(answers_file).write_text("".join(
            json.dumps({"question_id": q.qid, "image": q.image, "text": q.text, "answer": q.gold,
                        "category": q.categories["category"], "predicted": a}) + "\n"
            for q, a in zip(questions, answers, strict=True)))
    result = {category: sum(h) / len(h) for category, h in sorted(hits.items())}
    result.update({f"n_{category}": len(h) for category, h in sorted(hits.items())})
    return result
