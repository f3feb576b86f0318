"""Benchmark files: read each official layout and LLaVA's eval JSONL into questions with their gold.

One parser per file layout (``LAYOUTS``); which layouts a benchmark accepts, and how LLaVA's JSONL
carries its gold, is its record's business (``eval.benchmarks``). TextVQA's OCR tokens are added here
too (``add_ocr``): they are part of the question LLaVA asks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the records read these functions; only the type is needed here
    from eval.benchmarks import Benchmark


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
    """The layout of a file's data (a key of ``LAYOUTS``), or None."""
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


def _llava(data, path, benchmark: Benchmark, skip):
    """LLaVA's eval JSONL; POPE's own files and the panels' questions.jsonl have this shape too. Each
    benchmark's record says how a record carries its key and gold (``Benchmark.from_llava``)."""
    questions = []
    for i, r in enumerate(data):
        qid = _field(r, "question_id", path, i)
        q = Question(str(qid), qid, r.get("text", ""), r.get("image"))
        benchmark.from_llava(q, r, path, i)
        questions.append(q)
    return questions


# How a benchmark's LLaVA JSONL record gives its question key and gold: (question, record, path, index).
LlavaReader = Callable[[Question, dict, Path, int], None]


def llava_answers(q: Question, r: dict, path: Path, i: int) -> None:
    """Human answers, where the record lists them (LLaVA's VQAv2 and TextVQA files do not)."""
    if r.get("answers"):
        q.gold = _answers(r["answers"], path, i)


def llava_vizwiz(q: Question, r: dict, path: Path, i: int) -> None:
    """Keyed by image, to pair with VizWiz's own files."""
    if r.get("image"):
        q.key = str(r["image"])
    else:
        llava_answers(q, r, path, i)


def llava_textvqa(q: Question, r: dict, path: Path, i: int) -> None:
    """LLaVA's TextVQA file names each question by its image: image and question tell them apart."""
    if str(q.qid) == Path(str(r.get("image"))).stem:
        q.key = textvqa_pair(q.qid, q.text)
    else:
        llava_answers(q, r, path, i)


def llava_pope(q: Question, r: dict, path: Path, i: int) -> None:
    """POPE numbers each split from 1; the split is the record's category or its file's last word
    (coco_pope_random.json -> random)."""
    q.categories = {"split": str(r.get("category") or path.stem.rsplit("_", 1)[-1])}
    q.key, q.gold = f"{q.categories['split']}/{q.qid}", r.get("label")


def llava_answer_and_category(q: Question, r: dict, path: Path, i: int) -> None:
    """One gold ``answer`` and a ``category`` to break the score down by (GQA, the panels)."""
    q.gold = r.get("answer")
    q.categories = {"category": str(r["category"])} if r.get("category") is not None else {}


@dataclass(frozen=True)
class Layout:
    label: str  # how an error message names it
    parse: Callable[[Any, Path, Benchmark, Callable[[str], None]], list[Question]]


LAYOUTS = {
    "vqa_questions": Layout("VQAv2 questions", _vqa_questions),
    "vqa_annotations": Layout("VQAv2 annotations", _vqa_annotations),
    "textvqa": Layout("TextVQA", _textvqa),
    "vizwiz": Layout("VizWiz", _vizwiz),
    "gqa": Layout("GQA questions", _gqa),
    "scienceqa": Layout("ScienceQA problems.json", _scienceqa),
    "llava": Layout("LLaVA eval JSONL", _llava),
    "llava_conversations": Layout("LLaVA conversation", _llava_conversations),
}


def parse_file(benchmark: Benchmark, path: str | Path) -> tuple[list[Question], dict[str, int]]:
    """Questions (and gold, where the file has it) of one benchmark file, and counts of skipped records."""
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict) and "question_id" in data:  # a JSON-lines file holding one record
        data = [data]
    kind = _detect(data)
    if kind not in benchmark.formats:
        found = f"a {LAYOUTS[kind].label} file" if kind else "not a recognised benchmark file"
        expected = ", ".join(LAYOUTS[k].label for k in benchmark.formats)
        raise BadInput(f"{path} is {found}; --benchmark {benchmark.name} reads: {expected}")
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    questions = LAYOUTS[kind].parse(data, path, benchmark, skip)
    seen = set()
    for q in questions:
        if q.key in seen:
            raise BadInput(f"{path}: question id {q.key} appears twice")
        seen.add(q.key)
    return questions, skipped


def load_benchmark(
    benchmark: Benchmark, question_files: Sequence[str | Path] = (), annotation_files: Sequence[str | Path] = ()
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
    if benchmark.image_only:
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
    """Give TextVQA's official questions LLaVA's prompt text, OCR tokens from ``ocr_path`` or the record.

    Other questions are left as they are; ``ocr_path`` with none of TextVQA's official questions is an error.
    """
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
