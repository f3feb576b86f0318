"""VQA-style benchmarks on their own files: batched greedy answers, then the official scoring.

    python -m eval.vqa run --model M --benchmark B --questions Q [--images DIR] [--annotations A] --out OUT
    python -m eval.vqa score --benchmark B --predictions P [--annotations A] [--questions Q] [--mode M]

Benchmarks: vqav2, textvqa, vizwiz, gqa, pope, scienceqa (the IMG subset) and panels (``python -m
vlm.synth``). Question and annotation files are read in the benchmarks' official formats and as LLaVA's
eval JSONL. ``run`` appends each answer to ``OUT/answers.jsonl`` as it comes, so a rerun continues where
it stopped; it then writes ``OUT/submission.json`` (the benchmark's upload format, where it has one) and,
when gold answers are known, ``OUT/metrics.json``. It writes under OUT only; ``--save-to-model`` also
saves the metrics as ``<model>/results/<benchmark>.json`` (a local model folder's committed results).
TextVQA's official question file gets LLaVA's prompt, OCR tokens included, from ``--ocr
TextVQA_Rosetta_OCR_v0.2_val.json`` (see ``textvqa_prompt``). The scoring rules are in eval/scoring.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from eval import scoring
from vlm.files import write_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "demo"
# What loading a model raises for a broken folder: vlm.model.ModelFolderError is a ValueError, and
# safetensors' own error (no file name) where a loader lets it through.
MODEL_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, ValueError, OSError, SafetensorError)
SHORT_ANSWER = "Answer the question using a single word or phrase."
# LLaVA-1.5's response-format prompts, appended to each question.
PROMPT_SUFFIX = {
    "vqav2": SHORT_ANSWER,
    "textvqa": SHORT_ANSWER,
    "gqa": SHORT_ANSWER,
    "pope": SHORT_ANSWER,
    "panels": SHORT_ANSWER,
    "vizwiz": "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER,
    "scienceqa": "Answer with the option's letter from the given choices directly.",
}
# Which file layouts each benchmark accepts (see `_detect`).
FORMATS = {
    "vqav2": ("vqa_questions", "vqa_annotations", "llava"),
    "textvqa": ("textvqa", "llava"),
    "vizwiz": ("vizwiz", "llava"),
    "gqa": ("gqa", "llava"),
    "pope": ("llava",),
    "scienceqa": ("scienceqa", "llava", "llava_conversations"),
    "panels": ("llava",),
}
FORMAT_NAMES = {
    "vqa_questions": "VQAv2 questions",
    "vqa_annotations": "VQAv2 annotations",
    "textvqa": "TextVQA",
    "vizwiz": "VizWiz",
    "gqa": "GQA questions",
    "scienceqa": "ScienceQA problems.json",
    "llava": "LLaVA eval JSONL",
    "llava_conversations": "LLaVA conversation",
}
ANSWERS_FILE, SUBMISSION_FILE, METRICS_FILE = "answers.jsonl", "submission.json", "metrics.json"


class BadInput(Exception):
    """A problem with the user's files or arguments, worded for one line on stderr."""


@dataclass
class Question:
    key: str  # pairs questions, annotations and predictions: the id, "split/id" for POPE
    qid: Any  # the id as the benchmark's files write it
    text: str = ""
    image: str | None = None  # relative to the image folder
    gold: Any = None
    categories: dict[str, str] = field(default_factory=dict)
    ocr_image: str | None = None  # TextVQA's official records: the image whose OCR tokens the prompt lists
    ocr_tokens: list[str] | None = None  # those tokens, where the record itself carries them


# ---- reading files -------------------------------------------------------------------------------


def read_json(path: str | Path) -> Any:
    """A JSON document or a JSON-lines file (a list of its records); bad syntax names line and column."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path} is a folder, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path} does not exist") from None
    except UnicodeDecodeError as error:
        raise BadInput(f"{path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except OSError as error:
        raise BadInput(f"cannot read {path}: {error.strerror or error}") from None
    if not text.strip():
        raise BadInput(f"{path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg != "Extra data" or text.lstrip().startswith("["):
            raise BadInput(
                f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
            ) from None
    records = []  # split on "\n" only: str.splitlines would also cut at U+2028 inside a JSON string
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise BadInput(
                    f"{path}: invalid JSON line {number} column {error.colno}: {error.msg}"
                ) from None
    return records


def _detect(data: Any) -> str | None:
    if isinstance(data, dict):
        for marker, name in (
            ("questions", "vqa_questions"),
            ("annotations", "vqa_annotations"),
            ("data", "textvqa"),
        ):
            if isinstance(data.get(marker), list):
                return name
        first = next(iter(data.values()), None)
        if isinstance(first, dict) and "imageId" in first:
            return "gqa"
        if isinstance(first, dict) and "choices" in first:
            return "scienceqa"
        return None
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        if "conversations" in data[0]:
            return "llava_conversations"
        if "question_id" in data[0]:
            return "llava"
        if "image" in data[0] and "question" in data[0]:
            return "vizwiz"
    return None


def _field(record: Any, name: str, path: Path, index: Any) -> Any:
    if not isinstance(record, dict) or name not in record:
        raise BadInput(f"{path}: record {index} has no {name!r}")
    return record[name]


def _answers(raw: Any, path: Path, index: Any) -> list[str]:
    """Human answers as strings, whether stored as strings or as {"answer": ...} dicts."""
    if not isinstance(raw, list) or not raw:
        raise BadInput(f"{path}: record {index} has no list of answers")
    return [str(a["answer"] if isinstance(a, dict) else a) for a in raw]


def _answer_type(record: dict) -> dict[str, str]:
    return {"answer_type": str(record["answer_type"])} if "answer_type" in record else {}


# One parser per file layout: (data, path, benchmark, skip) -> questions;
# `skip(reason)` counts the records a parser leaves out.


def _records(records, path, id_field, image, need_question=True, need_answers=False) -> list[Question]:
    """VQAv2, TextVQA and VizWiz records: an id, a question, an image, and the human answers if known."""
    questions = []
    for i, r in enumerate(records):
        qid = _field(r, id_field, path, i)
        text = _field(r, "question", path, i) if need_question else r.get("question", "")
        has_answers = need_answers or bool(r.get("answers"))
        gold = _answers(_field(r, "answers", path, i), path, i) if has_answers else None
        questions.append(Question(str(qid), qid, text, image(r, i), gold, _answer_type(r)))
    return questions


def _vqa_questions(data, path, benchmark, skip):
    subtype = data.get("data_subtype", "val2014")  # COCO file names carry the split: COCO_val2014_...
    return _records(
        data["questions"],
        path,
        "question_id",
        lambda r, i: f"COCO_{subtype}_{int(_field(r, 'image_id', path, i)):012d}.jpg",
    )


def _vqa_annotations(data, path, benchmark, skip):
    return _records(
        data["annotations"], path, "question_id", lambda r, i: None, need_question=False, need_answers=True
    )


def _textvqa(data, path, benchmark, skip):
    questions = _records(data["data"], path, "question_id", lambda r, i: f"{_field(r, 'image_id', path, i)}.jpg")
    for q, r in zip(questions, data["data"], strict=True):
        q.ocr_image = str(r["image_id"])
        if isinstance(r.get("ocr_tokens"), list):  # lmms-eval's copy of the file carries them
            q.ocr_tokens = [str(t) for t in r["ocr_tokens"]]
    return questions


def _vizwiz(data, path, benchmark, skip):
    return _records(data, path, "image", lambda r, i: r["image"])  # VizWiz knows a question by its image


def _gqa(data, path, benchmark, skip):
    questions = []
    for qid, r in data.items():
        # The official score covers the balanced questions only.
        if isinstance(r, dict) and r.get("isBalanced") is False:
            skip("unbalanced")
            continue
        types = _field(r, "types", path, qid) if "types" in r else {}
        categories = {k: str(types[k]) for k in ("structural", "semantic") if k in types}
        if "structural" in types:
            categories["answer_kind"] = "open" if types["structural"] == "query" else "binary"
        questions.append(
            Question(
                str(qid),
                qid,
                _field(r, "question", path, qid),
                f"{_field(r, 'imageId', path, qid)}.jpg",
                r.get("answer"),
                categories,
            )
        )
    return questions


def _sqa_prompt(problem: dict) -> str:
    options = "\n".join(f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(problem["choices"]))
    context = f"Context: {problem['hint']}\n" if problem.get("hint") else ""
    return f"{context}{problem['question']}\n{options}"


def _scienceqa(data, path, benchmark, skip):
    questions = []
    for pid, r in data.items():
        if not isinstance(r, dict) or r.get("split") != "test" or not r.get("image"):
            skip("not_test_with_image")  # the IMG subset: test questions shown with an image
            continue
        gold = (int(_field(r, "answer", path, pid)), len(_field(r, "choices", path, pid)))
        questions.append(
            Question(
                str(pid),
                pid,
                _sqa_prompt(r),
                f"{pid}/{r['image']}",
                gold,
                {"subject": str(r["subject"])} if "subject" in r else {},
            )
        )
    return questions


def _llava_conversations(data, path, benchmark, skip):
    questions = []
    for i, r in enumerate(data):
        turns = _field(r, "conversations", path, i)
        if not turns or not isinstance(turns[0], dict) or "value" not in turns[0]:
            raise BadInput(f"{path}: record {i} has no first conversation turn")
        text = turns[0]["value"].replace("<image>", "").strip()
        questions.append(Question(str(_field(r, "id", path, i)), r["id"], text, r.get("image")))
    return questions


def _llava(data, path, benchmark, skip):
    """LLaVA's eval JSONL; POPE's own files and the panels' questions.jsonl have this shape too."""
    questions = []
    for i, r in enumerate(data):
        qid = _field(r, "question_id", path, i)
        q = Question(str(qid), qid, r.get("text", ""), r.get("image"))
        if benchmark == "vizwiz" and r.get("image"):  # pairs with VizWiz's own files, keyed by image
            q.key = str(r["image"])
        elif benchmark == "textvqa" and str(qid) == Path(str(r.get("image"))).stem:
            # LLaVA's TextVQA file names each question by its image: image and question tell them apart.
            q.key = textvqa_pair(qid, q.text)
        elif benchmark == "pope":
            # POPE numbers each split from 1; the split is the record's category or its file's last word
            # (coco_pope_random.json -> random).
            q.categories = {"split": str(r.get("category") or path.stem.rsplit("_", 1)[-1])}
            q.key, q.gold = f"{q.categories['split']}/{qid}", r.get("label")
        elif benchmark in ("gqa", "panels"):
            q.gold = r.get("answer")
            q.categories = {"category": str(r["category"])} if r.get("category") is not None else {}
        elif r.get("answers"):
            q.gold = _answers(r["answers"], path, i)
        questions.append(q)
    return questions


PARSERS = {
    "vqa_questions": _vqa_questions,
    "vqa_annotations": _vqa_annotations,
    "textvqa": _textvqa,
    "vizwiz": _vizwiz,
    "gqa": _gqa,
    "scienceqa": _scienceqa,
    "llava_conversations": _llava_conversations,
    "llava": _llava,
}


def parse_file(benchmark: str, path: str | Path) -> tuple[list[Question], dict[str, int]]:
    """Questions (and gold, where the file has it) of one benchmark file, and counts of skipped records."""
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict) and "question_id" in data:  # a JSON-lines file holding one record
        data = [data]
    kind = _detect(data)
    if kind not in FORMATS[benchmark]:
        found = f"a {FORMAT_NAMES[kind]} file" if kind else "not a recognised benchmark file"
        expected = ", ".join(FORMAT_NAMES[k] for k in FORMATS[benchmark])
        raise BadInput(f"{path} is {found}; --benchmark {benchmark} reads: {expected}")
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    questions = PARSERS[kind](data, path, benchmark, skip)
    seen = set()
    for q in questions:
        if q.key in seen:
            raise BadInput(f"{path}: question id {q.key} appears twice")
        seen.add(q.key)
    return questions, skipped


def load_benchmark(
    benchmark: str, question_files: Sequence[str | Path] = (), annotation_files: Sequence[str | Path] = ()
) -> tuple[list[Question], dict[str, int]]:
    """The questions in scope, with gold merged in from the annotations by key."""

    def load(paths):
        out, skipped = [], {}
        for p in paths:
            qs, sk = parse_file(benchmark, p)
            out += qs
            for k, v in sk.items():
                skipped[k] = skipped.get(k, 0) + v
        keys = [q.key for q in out]
        if len(set(keys)) != len(keys):
            raise BadInput(f"the same question id appears in several of {', '.join(map(str, paths))}")
        return out, skipped

    questions, skipped = load(question_files)
    annotations, ann_skipped = load(annotation_files)
    if not question_files:
        return annotations, ann_skipped
    if benchmark == "scienceqa":  # the IMG subset: questions shown with an image
        with_image = [q for q in questions if q.image]
        if len(with_image) < len(questions):
            skipped["text_only"] = len(questions) - len(with_image)
        questions = with_image
    if annotations:
        gold = {a.key: a for a in annotations}
        for a in annotations:  # LLaVA's TextVQA questions pair with the official file by image and question
            if a.ocr_image is not None:
                gold.setdefault(textvqa_pair(a.ocr_image, a.text), a)
        unmatched = [q.key for q in questions if q.key not in gold]
        if unmatched:
            raise BadInput(
                f"{len(unmatched)} of {len(questions)} questions have no annotation in "
                f"{', '.join(map(str, annotation_files))} (first ids: {', '.join(unmatched[:5])})"
            )
        for q in questions:
            q.gold = gold[q.key].gold
            q.categories = {**q.categories, **gold[q.key].categories}
            q.text = q.text or gold[q.key].text
    return questions, skipped


# ---- TextVQA's OCR tokens -------------------------------------------------------------------------

OCR_LINE = "Reference OCR token: "


def textvqa_pair(image_id: Any, prompt: str) -> str:
    """``image/question`` as LLaVA's TextVQA scorer pairs a prompt with the official file: the prompt's
    question line (not the OCR line nor the suffix), lowercased."""
    lines = prompt.split("\n")
    question = lines[1] if prompt.startswith(OCR_LINE.strip()) and len(lines) > 1 else lines[0]
    return f"{image_id}/{question.strip().lower()}"


def textvqa_prompt(question: str, tokens: Sequence[str]) -> str:
    """A question as LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` writes it (the suffix comes later).

    The question capitalised as Python's ``str.capitalize`` does, then a line listing every Rosetta OCR
    token of the image (TextVQA_Rosetta_OCR_v0.2, in the file's order) joined by ", "; an image without
    tokens gets no such line (LLaVA's scorer reads those two-line prompts too).
    """
    head = question.capitalize()
    return f"{head}\n{OCR_LINE}{', '.join(tokens)}" if tokens else head


def read_ocr(path: str | Path) -> dict[str, list[str]]:
    """TextVQA's OCR file (``TextVQA_Rosetta_OCR_v0.2_val.json``): image id -> its OCR tokens."""
    data = read_json(path)
    records = data.get("data") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise BadInput(f"{path} is not a TextVQA OCR file: no 'data' list of image_id / ocr_tokens records")
    table = {}
    for i, r in enumerate(records):
        tokens = _field(r, "ocr_tokens", path, i)
        if not isinstance(tokens, list):
            raise BadInput(f"{path}: record {i} has no list of ocr_tokens")
        table[str(_field(r, "image_id", path, i))] = [str(t) for t in tokens]
    return table


def add_ocr(questions: Sequence[Question], ocr_path: str | Path | None, no_ocr: bool = False) -> None:
    """Give TextVQA's official questions LLaVA's prompt text, OCR tokens from ``ocr_path`` or the record."""
    official = [q for q in questions if q.ocr_image is not None]
    if not official:
        if ocr_path:
            raise BadInput("--ocr applies to TextVQA's official question file (TextVQA_0.5.1_val.json) only")
        return
    table = read_ocr(ocr_path) if ocr_path else {}
    if ocr_path:
        absent = sorted({q.ocr_image for q in official if q.ocr_image not in table})
        if absent:
            raise BadInput(f"{len(absent)} images of the questions have no record in {ocr_path} (first: {absent[0]})")
    elif not no_ocr and any(q.ocr_tokens is None for q in official):
        raise BadInput(
            "LLaVA's TextVQA prompt lists each image's OCR tokens, which TextVQA_0.5.1_val.json does not hold: "
            "pass --ocr TextVQA_Rosetta_OCR_v0.2_val.json (or --no-ocr to ask without them)"
        )
    for q in official:
        tokens = [] if no_ocr else table[q.ocr_image] if ocr_path else q.ocr_tokens
        q.text = textvqa_prompt(q.text, tokens)


# ---- predictions ---------------------------------------------------------------------------------


def _resolver(questions: Sequence[Question]):
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
    resolve = _resolver(questions)
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
    info = {"duplicates": {"count": len(duplicates), "ids": duplicates[: scoring.ID_SAMPLE]}}
    if len(models) == 1:
        info["model"] = models.pop()
    return predictions, info


# ---- scoring and reporting -----------------------------------------------------------------------


def evaluate(
    benchmark: str, questions: Sequence[Question], predictions: dict[str, str], mode: str | None
) -> dict:
    if not questions:
        raise BadInput("no questions to score")
    if any(q.gold is None for q in questions):
        raise BadInput(
            f"{sum(q.gold is None for q in questions)} questions have no gold answer; "
            "pass the annotations with --annotations"
        )
    if predictions and not any(q.key in predictions for q in questions):
        raise BadInput(
            f"none of the {len(predictions)} prediction ids match a question id "
            f"(predictions: {', '.join(list(predictions)[:3])}; questions: "
            f"{', '.join(q.key for q in questions[:3])})"
        )
    golds = [scoring.Gold(q.key, q.gold, q.categories) for q in questions]
    try:
        return scoring.score(benchmark, golds, predictions, mode)
    except (ValueError, TypeError, KeyError) as error:  # a malformed gold record
        raise BadInput(f"cannot score {benchmark}: {error}") from None


def _warn_counts(result: dict) -> None:
    for field_name, what in (
        ("missing", "questions have no prediction (scored 0)"),
        ("empty", "predictions are empty (scored 0)"),
        ("unknown_ids", "predictions have an id that is not a question (not scored)"),
        ("duplicates", "predictions repeat an id (the first one counts)"),
    ):
        entry = result.get(field_name) or {}
        if entry.get("count"):
            print(
                f"warning: {entry['count']} {what}: {', '.join(map(str, entry['ids'][:5]))}"
                f"{' ...' if entry['count'] > 5 else ''}",
                file=sys.stderr,
            )


def _with_context(result: dict, model: str | None, settings: dict, extra: dict) -> dict:
    head = {k: result[k] for k in ("benchmark", "mode", "metric", "n", "value", "interval")}
    return {
        **head,
        "model": model,
        "settings": settings,
        **{k: v for k, v in result.items() if k not in head},
        **extra,
    }


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def submission(
    benchmark: str, questions: Sequence[Question], answers: dict[str, str], mode: str
) -> list | None:
    """Answers in the benchmark's upload format, processed as the chosen mode's tool would upload them."""
    done = [q for q in questions if q.key in answers]
    if benchmark in ("vqav2", "textvqa", "vizwiz"):
        process = scoring.evalai_answer if mode == "llava" else (lambda text: text)
        if benchmark == "vizwiz":
            return [{"image": q.image or q.qid, "answer": process(answers[q.key])} for q in done]
        return [{"question_id": q.qid, "answer": process(answers[q.key])} for q in done]
    if benchmark == "gqa":
        process = (lambda text: text.rstrip(".").lower()) if mode == "llava" else (lambda text: text)
        return [{"questionId": q.qid, "prediction": process(answers[q.key])} for q in done]
    return None  # POPE, ScienceQA and panels are scored from the answers JSONL itself


# ---- inference -----------------------------------------------------------------------------------


def with_suffix(text: str, suffix: str) -> str:
    """Append the suffix's lines that the question does not already carry (LLaVA files often do)."""
    missing = [line for line in suffix.splitlines() if line not in text]
    return "\n".join([text, *missing]) if missing else text


def model_files_stamp(folder: Path) -> str:
    """A short stamp of a local model folder's files (name, size, modification time; ``results/`` left
    out, the evaluations write there): retrained into the same folder, the model is another model."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and "results" not in f.relative_to(folder).parts)
    stamp = hashlib.sha256()
    for f in files:
        info = f.stat()
        stamp.update(f"{f.relative_to(folder).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return stamp.hexdigest()[:16]


def _read_answers(path: Path, questions: Sequence[Question], settings: dict, model_id: str) -> dict[str, str]:
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
    resolve = _resolver(questions)
    prompts = {q.key: with_suffix(q.text, settings["prompt_suffix"]) for q in questions}
    answers = {}
    for number, r in enumerate(records, 1):
        metadata = r.get("metadata") or {}
        if r.get("model_id") == model_id and metadata.get("model_files") != settings["model_files"]:
            raise BadInput(
                f"{path}: line {number} was written by {model_id} before its files changed "
                f"(stamp {metadata.get('model_files')}, now {settings['model_files']}); use another --out"
            )
        same = r.get("model_id") == model_id and all(
            metadata.get(k) == settings[k] for k in ("benchmark", "max_new_tokens", "prompt_suffix")
        )
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


def _model_error(model: str) -> str | None:
    """A local model that is missing or incomplete; anything else (a hub id) is left to the loader."""
    path = Path(model)
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"model folder {model} has no config.json"
    if path.is_file():
        return f"--model {model} is a file, not a model folder"
    if path.is_absolute() or path.exists():
        return f"model {model} not found: pass --model with a model folder or a hub id"
    return None


def generate_answers(
    model,
    processor,
    questions: Sequence[Question],
    images_dir: Path,
    suffix: str,
    batch_size: int,
    max_new_tokens: int,
    on_batch,
) -> None:
    """Greedy answers, a batch at a time; ``on_batch(questions, prompts, texts)`` stores each batch.

    Questions are taken grouped by image (in order of first appearance), so a batch holds several
    questions per image and ``generate_shared`` runs each image and the shared prompt start once.
    """
    import torch
    from tqdm import tqdm

    from vlm.images import load_image

    first_seen: dict[str, int] = {}
    for q in questions:
        first_seen.setdefault(q.image, len(first_seen))
    ordered = sorted(questions, key=lambda q: first_seen[q.image])
    with tqdm(total=len(ordered), desc="answering", unit="q") as bar:
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            prompts = [with_suffix(q.text, suffix) for q in batch]
            texts = [
                processor.apply_chat_template([{"role": "user", "content": f"{processor.image_token}\n{p}"}])
                for p in prompts
            ]
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


def _mode(benchmark: str, mode: str | None) -> str:
    mode = mode or scoring.DEFAULT_MODE[benchmark]
    if mode not in scoring.MODES[benchmark]:
        raise BadInput(
            f"--mode {mode} does not apply to {benchmark}; choose from {', '.join(scoring.MODES[benchmark])}"
        )
    return mode


def _check_run_inputs(args: argparse.Namespace, questions: Sequence[Question], images_dir: Path) -> None:
    """Everything that can be wrong before a model is loaded, so a bad call fails in a second."""
    if not questions:
        raise BadInput("the question files hold no questions for this benchmark")
    no_image = [q.key for q in questions if not q.image]
    if no_image:
        raise BadInput(f"{len(no_image)} questions name no image (first ids: {', '.join(no_image[:5])})")
    absent = [q.image for q in questions if not (images_dir / q.image).is_file()]
    if absent:
        raise BadInput(
            f"{len(absent)} of {len(questions)} images are not in {images_dir} (first: {absent[0]})"
        )
    problem = _model_error(str(args.model))
    if problem:
        raise BadInput(problem)


def _answer(
    args,
    todo: Sequence[Question],
    images_dir: Path,
    settings: dict,
    model_id: str,
    answers_path: Path,
    answers: dict[str, str],
    total: int,
) -> None:
    """Load the model and answer ``todo`` (of ``total``), appending each finished batch to ``answers_path``."""
    from vlm.images import ImageError
    from vlm.loading import load_pretrained

    try:
        model, processor = load_pretrained(str(args.model), device=args.device, dtype=args.dtype)
    except MODEL_ERRORS as error:  # vlm.model.ModelFolderError (a ValueError) names the broken file
        raise BadInput(f"cannot load model {args.model}: {' '.join(str(error).split())}") from None
    model.eval()
    print(f"{total - len(todo)} of {total} already answered in {answers_path}; answering {len(todo)}", file=sys.stderr)
    metadata = {k: settings[k] for k in ("benchmark", "max_new_tokens", "batch_size", "prompt_suffix", "model_files")}
    with answers_path.open("a", encoding="utf-8") as sink:

        def store(batch, prompts, replies):
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
                answers[q.key] = reply
            sink.flush()  # every finished batch survives an interruption

        try:
            generate_answers(
                model,
                processor,
                todo,
                images_dir,
                settings["prompt_suffix"],
                args.batch_size,
                args.max_new_tokens,
                store,
            )
        except ImageError as error:
            raise BadInput(f"{error} (answers so far are kept in {answers_path})") from None


def run(args: argparse.Namespace) -> dict | None:
    benchmark, mode = args.benchmark, _mode(args.benchmark, args.mode)
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise BadInput("--batch-size, --max-new-tokens and --limit must be at least 1")
    questions, skipped = load_benchmark(benchmark, args.questions, args.annotations or ())
    questions = questions[: args.limit] if args.limit else questions
    if benchmark == "textvqa" or args.ocr:
        add_ocr(questions, args.ocr, args.no_ocr)
    images_dir = Path(args.images) if args.images else Path(args.questions[0]).parent
    for flag, folder in (("--images", images_dir), ("--out", Path(args.out))):
        if folder.exists() and not folder.is_dir():
            raise BadInput(f"{flag} {folder} is a file, not a folder")
    if not images_dir.is_dir():
        raise BadInput(f"--images {images_dir} does not exist")
    _check_run_inputs(args, questions, images_dir)
    local_model = Path(args.model).is_dir()
    if args.save_to_model and not local_model:
        raise BadInput(f"--save-to-model needs a local model folder, not {args.model}")
    model_id = str(Path(args.model).resolve()) if local_model else str(args.model)
    settings = {
        "benchmark": benchmark,
        "mode": mode,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "prompt_suffix": PROMPT_SUFFIX[benchmark],
        "limit": args.limit,
        "questions": [str(p) for p in args.questions],
        "annotations": [str(p) for p in args.annotations or ()],
        "ocr": str(args.ocr) if args.ocr else "none" if args.no_ocr else None,
        "model_files": model_files_stamp(Path(args.model)) if local_model else None,
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers_path = out / ANSWERS_FILE
    answers = _read_answers(answers_path, questions, settings, model_id)
    todo = [q for q in questions if q.key not in answers]
    if todo:
        _answer(args, todo, images_dir, settings, model_id, answers_path, answers, len(questions))
    upload = submission(benchmark, questions, answers, mode)
    if upload is not None:
        _write_json(out / SUBMISSION_FILE, upload)
    if any(q.gold is None for q in questions):
        print(
            f"no gold answers for these questions: wrote {answers_path}"
            f"{' and ' + str(out / SUBMISSION_FILE) if upload is not None else ''}; no metrics",
            file=sys.stderr,
        )
        return None
    result = evaluate(benchmark, questions, answers, mode)
    result = _with_context(result, model_id, settings, {"skipped": skipped})
    _write_json(out / METRICS_FILE, result)
    if args.save_to_model:  # only when asked: the model folder's results may be committed files
        _write_json(Path(args.model) / "results" / f"{benchmark}.json", result)
    return result


def score_files(args: argparse.Namespace) -> dict:
    mode = _mode(args.benchmark, args.mode)
    if not args.questions and not args.annotations:
        raise BadInput("pass --annotations (or --questions with gold answers inside) to score against")
    questions, skipped = load_benchmark(args.benchmark, args.questions or (), args.annotations or ())
    predictions, info = read_predictions(args.predictions, questions)
    result = evaluate(args.benchmark, questions, predictions, mode)
    settings = {
        "benchmark": args.benchmark,
        "mode": mode,
        "predictions": str(args.predictions),
        "questions": [str(p) for p in args.questions or ()],
        "annotations": [str(p) for p in args.annotations or ()],
    }
    return _with_context(result, info.pop("model", None), settings, {**info, "skipped": skipped})


# ---- command line --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        raise BadInput(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m eval.vqa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    modes = sorted({m for ms in scoring.MODES.values() for m in ms})
    common = {"choices": scoring.BENCHMARKS, "required": True}

    run_p = commands.add_parser("run", help="answer a benchmark with a model, then score it")
    run_p.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="model folder or hub id (default: models/demo)"
    )
    run_p.add_argument("--benchmark", **common)
    run_p.add_argument("--questions", nargs="+", required=True, help="question file(s); POPE: one per split")
    run_p.add_argument("--images", help="image folder (default: the folder of the first questions file)")
    run_p.add_argument("--annotations", nargs="+", help="gold answers, where the question file has none")
    run_p.add_argument(
        "--out", required=True, help="output folder: answers.jsonl, submission.json, metrics.json"
    )
    run_p.add_argument(
        "--mode", choices=modes, help="scoring mode (default: the one LLaVA-1.5's numbers use)"
    )
    run_p.add_argument("--batch-size", type=int, default=8)
    run_p.add_argument("--max-new-tokens", type=int, default=128)
    run_p.add_argument("--limit", type=int, help="answer only the first N questions")
    ocr = run_p.add_mutually_exclusive_group()
    ocr.add_argument("--ocr", help="TextVQA: TextVQA_Rosetta_OCR_v0.2_val.json, the OCR tokens LLaVA's prompt lists")
    ocr.add_argument("--no-ocr", action="store_true", help="TextVQA: ask the official questions without OCR tokens")
    run_p.add_argument("--save-to-model", action="store_true",
                       help="also write the metrics to <model>/results/<benchmark>.json (a local model folder)")
    run_p.add_argument("--device", default="cpu")
    run_p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")

    score_p = commands.add_parser("score", help="score a predictions file; prints the metrics as JSON")
    score_p.add_argument("--benchmark", **common)
    score_p.add_argument(
        "--predictions", required=True, help="LLaVA answers JSONL or the benchmark's submission file"
    )
    score_p.add_argument("--annotations", nargs="+", help="gold answers (annotation or question files)")
    score_p.add_argument("--questions", nargs="+", help="question file(s) that set which questions count")
    score_p.add_argument("--mode", choices=modes, help="official | llava | m4c (VQA); llava | official (GQA)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = run(args) if args.command == "run" else score_files(args)
    except BadInput as error:
        print(f"eval.vqa: error: {error}", file=sys.stderr)
        return 2
    if result is not None:
        _warn_counts(result)
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
