"""Answers on disk: the run's own ``answers.jsonl`` (resumed, refused when stale) and predictions to score.

``run`` appends each batch of answers as it comes (``append_answers``), so a rerun continues where the
last one stopped (``read_answers``); answers written by another model, other settings, a retrained model
in the same folder or for another prompt are refused rather than mixed in. ``read_predictions`` reads
LLaVA's answer JSONL or a benchmark's submission file for ``score``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from eval.answering import with_suffix
from eval.formats import BadInput, Question, read_json, textvqa_pair
from eval.scoring import ID_SAMPLE

ANSWERS_FILE = "answers.jsonl"
# The settings an answer is stamped with; an answer with other values of the first three is not reused.
REUSE_KEYS = ("benchmark", "max_new_tokens", "prompt_suffix")
STAMP_KEYS = ("benchmark", "max_new_tokens", "batch_size", "prompt_suffix", "model_files")


def model_files_stamp(folder: Path) -> str:
    """A short stamp of a local model folder's files (name, size, modification time; ``results/`` left
    out, the evaluations write there): retrained into the same folder, the model is another model."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and "results" not in f.relative_to(folder).parts)
    stamp = hashlib.sha256()
    for f in files:
        info = f.stat()
        stamp.update(f"{f.relative_to(folder).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return stamp.hexdigest()[:16]


def resolver(questions: Sequence[Question]) -> Callable[..., str]:
    """Maps a prediction record to a question key: by id, and by split too where ids repeat (POPE)."""
    keys = {q.key for q in questions}
    by_id: dict[str, list[str]] = {}
    for q in questions:
        by_id.setdefault(str(q.qid), []).append(q.key)

    def resolve(record_id: Any, category: Any = None, prompt: Any = None) -> str:
        if category is not None and f"{category}/{record_id}" in keys:
            return f"{category}/{record_id}"
        if isinstance(prompt, str) and textvqa_pair(record_id, prompt) in keys:  # LLaVA's TextVQA answers
            return textvqa_pair(record_id, prompt)
        found = by_id.get(str(record_id), [])
        if len(found) > 1:
            raise BadInput(
                f"prediction id {record_id} matches {len(found)} questions ({', '.join(found[:3])}); "
                "give each prediction a 'category' naming its split"
            )
        return found[0] if found else str(record_id)

    return resolve


def read_answers(path: Path, questions: Sequence[Question], settings: dict, model_id: str) -> dict[str, str]:
    """Answers already in OUT/answers.jsonl; a crash can leave a cut-off last line, which is dropped."""
    if not path.exists():
        return {}
    *complete, tail = path.read_text(encoding="utf-8").split("\n")  # "\n" only: answers may hold U+2028
    if tail:  # every answer is written with its newline, so a line without one was cut off by a crash
        print(f"warning: {path}: dropping the cut-off last line of an interrupted run", file=sys.stderr)
        path.write_text("".join(line + "\n" for line in complete), encoding="utf-8")
    records = []
    for number, line in enumerate(complete, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise BadInput(
                f"{path}: line {number} is not valid JSON; remove the file or use another --out"
            ) from None
    resolve = resolver(questions)
    prompts = {q.key: with_suffix(q.text, settings["prompt_suffix"]) for q in questions}
    answers = {}
    for number, r in enumerate(records, 1):
        metadata = r.get("metadata") or {}
        if r.get("model_id") == model_id and metadata.get("model_files") != settings["model_files"]:
            raise BadInput(
                f"{path}: line {number} was written by {model_id} before its files changed "
                f"(stamp {metadata.get('model_files')}, now {settings['model_files']}); use another --out"
            )
        same = r.get("model_id") == model_id and all(metadata.get(k) == settings[k] for k in REUSE_KEYS)
        if not same:
            raise BadInput(
                f"{path}: line {number} was written by another model or settings "
                f"({r.get('model_id')}, {r.get('metadata')}); use another --out"
            )
        key = resolve(r.get("question_id"), r.get("category"), r.get("prompt"))
        if key in prompts and r.get("prompt", prompts[key]) != prompts[key]:  # e.g. asked without OCR tokens
            raise BadInput(
                f"{path}: line {number} was asked another prompt ({r['prompt'][:60]!r}; now "
                f"{prompts[key][:60]!r}); use another --out"
            )
        answers[key] = r.get("text", "")
    return answers


def append_answers(
    sink: IO[str],
    batch: Sequence[Question],
    prompts: Sequence[str],
    replies: Sequence[str],
    model_id: str,
    settings: dict,
) -> None:
    """One LLaVA-style answer record per question, stamped with the run's settings; flushed, so every
    finished batch survives an interruption."""
    metadata = {k: settings[k] for k in STAMP_KEYS}
    for q, prompt, reply in zip(batch, prompts, replies, strict=True):
        record = {
            "question_id": q.qid,
            "prompt": prompt,
            "text": reply,
            "answer_id": q.key,
            "model_id": model_id,
            "metadata": metadata,
        }
        if "split" in q.categories:  # POPE ids repeat across splits
            record["category"] = q.categories["split"]
        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    sink.flush()


def read_predictions(path: str | Path, questions: Sequence[Question]) -> tuple[dict[str, str], dict]:
    """Predictions (key -> text) from LLaVA answer JSONL or a submission file, and what was odd about them."""
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise BadInput(f"{path} is not a list of prediction records")
    if not data:
        raise BadInput(f"{path} holds no predictions")
    resolve = resolver(questions)
    predictions: dict[str, str] = {}
    duplicates, models = [], set()
    for i, r in enumerate(data):
        id_field = next((k for k in ("question_id", "questionId", "image") if k in r), None)
        text_field = next((k for k in ("text", "answer", "prediction") if k in r), None)
        if id_field is None or text_field is None:
            raise BadInput(
                f"{path}: record {i} needs an id (question_id, questionId or image) and an answer "
                "(text, answer or prediction)"
            )
        key = resolve(r[id_field], r.get("category"), r.get("prompt"))
        text = r[text_field]
        if key in predictions:
            duplicates.append(key)
            continue
        predictions[key] = "" if text is None else str(text)
        if "model_id" in r:
            models.add(str(r["model_id"]))
    info = {"duplicates": {"count": len(duplicates), "ids": duplicates[:ID_SAMPLE]}}
    if len(models) == 1:
        info["model"] = models.pop()
    return predictions, info
