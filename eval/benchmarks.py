"""The benchmarks ``python -m eval.vqa`` knows: one record each, and everything that reads them.

A record names the file layouts the benchmark accepts (``eval.formats.LAYOUTS``), how LLaVA's eval
JSONL carries its gold, the response-format prompt appended to each question, its scoring modes and
scorer (``eval.scoring``), and its upload format. Adding a benchmark is one ``Benchmark(...)`` in
``TABLE`` (and a parser or scorer, where none of those there fits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from eval import formats
from eval.formats import Question
from eval.scoring import (
    GQA_MODES,
    VQA_MODES,
    Gold,
    answered,
    evalai_answer,
    ids,
    score_gqa,
    score_panels,
    score_pope,
    score_scienceqa,
    score_vqa,
)

SHORT_ANSWER = "Answer the question using a single word or phrase."
# (golds, predictions by key, mode) -> the benchmark's numbers
Scorer = Callable[[Sequence[Gold], Mapping[str, str | None], str], dict]
# (questions answered, answers by key, mode) -> the upload file's records
Upload = Callable[[Sequence[Question], Mapping[str, str], str], list]


def _vqa_upload(questions: Sequence[Question], answers: Mapping[str, str], mode: str) -> list:
    process = evalai_answer if mode == "llava" else (lambda text: text)
    return [{"question_id": q.qid, "answer": process(answers[q.key])} for q in questions]


def _vizwiz_upload(questions: Sequence[Question], answers: Mapping[str, str], mode: str) -> list:
    process = evalai_answer if mode == "llava" else (lambda text: text)
    return [{"image": q.image or q.qid, "answer": process(answers[q.key])} for q in questions]


def _gqa_upload(questions: Sequence[Question], answers: Mapping[str, str], mode: str) -> list:
    process = (lambda text: text.rstrip(".").lower()) if mode == "llava" else (lambda text: text)
    return [{"questionId": q.qid, "prediction": process(answers[q.key])} for q in questions]


@dataclass(frozen=True)
class Benchmark:
    name: str
    formats: tuple[str, ...]  # the file layouts it reads, keys of eval.formats.LAYOUTS
    scorer: Scorer
    modes: tuple[str, ...] = ("official",)
    default_mode: str = "official"  # the mode LLaVA-1.5's published numbers use
    prompt_suffix: str = SHORT_ANSWER  # LLaVA-1.5's response-format prompt, appended to each question
    from_llava: formats.LlavaReader = formats.llava_answers
    upload: Upload | None = None  # the upload format, where the benchmark has one
    image_only: bool = False  # questions without an image are left out (counted as "text_only")

    def mode(self, mode: str | None) -> str:
        """``mode``, or the default when None; a mode the benchmark has not raises ValueError."""
        mode = mode or self.default_mode
        if mode not in self.modes:
            raise ValueError(f"--mode {mode} does not apply to {self.name}; choose from {', '.join(self.modes)}")
        return mode


TABLE = (
    Benchmark("vqav2", ("vqa_questions", "vqa_annotations", "llava"), score_vqa, VQA_MODES, "llava",
              upload=_vqa_upload),
    Benchmark("textvqa", ("textvqa", "llava"), score_vqa, VQA_MODES, "m4c", from_llava=formats.llava_textvqa,
              upload=_vqa_upload),
    Benchmark("vizwiz", ("vizwiz", "llava"), score_vqa, VQA_MODES, "llava",
              prompt_suffix="When the provided information is insufficient, respond with 'Unanswerable'.\n"
              + SHORT_ANSWER, from_llava=formats.llava_vizwiz, upload=_vizwiz_upload),
    Benchmark("gqa", ("gqa", "llava"), score_gqa, GQA_MODES, "llava", from_llava=formats.llava_answer_and_category,
              upload=_gqa_upload),
    Benchmark("pope", ("llava",), score_pope, from_llava=formats.llava_pope),
    Benchmark("scienceqa", ("scienceqa", "llava", "llava_conversations"), score_scienceqa,
              prompt_suffix="Answer with the option's letter from the given choices directly.", image_only=True),
    Benchmark("panels", ("llava",), score_panels, from_llava=formats.llava_answer_and_category),
)
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in TABLE}
ALL_MODES = tuple(sorted({m for b in TABLE for m in b.modes}))


def score(
    benchmark: str, golds: Sequence[Gold], predictions: Mapping[str, str | None], mode: str | None = None
) -> dict:
    """Score ``predictions`` (key -> text) against ``golds`` by the benchmark's rules.

    Every gold question counts: a missing or empty prediction scores 0 and is listed under ``missing`` /
    ``empty``; predictions whose key is not among the golds are listed under ``unknown_ids``.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    record = BENCHMARKS[benchmark]
    mode = record.mode(mode)
    known = {g.key for g in golds}
    result = {"benchmark": benchmark, "mode": mode, **record.scorer(golds, predictions, mode)}
    result["missing"] = ids([g.key for g in golds if g.key not in predictions])
    result["empty"] = ids([g.key for g in golds if g.key in predictions and not answered(predictions[g.key])])
    result["unknown_ids"] = ids([key for key in predictions if key not in known])
    return result
