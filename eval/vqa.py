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
TextVQA_Rosetta_OCR_v0.2_val.json``. Add ``--verbose`` to see the libraries' loading bars and warnings.

Where things are: each benchmark's record (formats, prompt, modes, scorer) in eval/benchmarks.py, file
reading in eval/formats.py, the answers file in eval/answers.py, the answering loop in eval/answering.py,
the scoring rules in eval/scoring.py; this module runs the model and reads the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.answering import generate_answers
from eval.answers import ANSWERS_FILE, append_answers, model_files_stamp, read_answers, read_predictions
from eval.benchmarks import ALL_MODES, BENCHMARKS, Benchmark
from eval.benchmarks import score as score_benchmark
from eval.formats import BadInput, Question, add_ocr, load_benchmark
from eval.scoring import Gold
from vlm.cli import DEMO_MODEL, ArgumentParser, UsageError, one_line, set_verbosity
from vlm.files import write_atomic

SUBMISSION_FILE, METRICS_FILE = "submission.json", "metrics.json"


def benchmark_record(name: str, mode: str | None) -> tuple[Benchmark, str]:
    """The benchmark's record and the scoring mode to use (its default when ``mode`` is None)."""
    record = BENCHMARKS[name]
    try:
        return record, record.mode(mode)
    except ValueError as error:
        raise BadInput(str(error)) from None


# ---- the model run ------------------------------------------------------------------------------


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
    args: argparse.Namespace,
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
    from vlm.loading import LOAD_ERRORS, load_pretrained

    try:
        model, processor = load_pretrained(str(args.model), device=args.device, dtype=args.dtype)
    except LOAD_ERRORS as error:  # vlm.loading.ModelFolderError (a ValueError) names the broken file
        raise BadInput(f"cannot load model {args.model}: {one_line(error)}") from None
    model.eval()
    print(f"{total - len(todo)} of {total} already answered in {answers_path}; answering {len(todo)}", file=sys.stderr)
    with answers_path.open("a", encoding="utf-8") as sink:

        def store(batch: Sequence[Question], prompts: list[str], replies: list[str]) -> None:
            append_answers(sink, batch, prompts, replies, model_id, settings)
            answers.update((q.key, reply) for q, reply in zip(batch, replies, strict=True))

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
    """``run``: answer what OUT/answers.jsonl lacks, write the submission and, with gold, the metrics."""
    benchmark, (record, mode) = args.benchmark, benchmark_record(args.benchmark, args.mode)
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise BadInput("--batch-size, --max-new-tokens and --limit must be at least 1")
    questions, skipped = load_benchmark(record, args.questions, args.annotations or ())
    questions = questions[: args.limit] if args.limit else questions
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
        "prompt_suffix": record.prompt_suffix,
        "limit": args.limit,
        "questions": [str(p) for p in args.questions],
        "annotations": [str(p) for p in args.annotations or ()],
        "ocr": str(args.ocr) if args.ocr else "none" if args.no_ocr else None,
        "model_files": model_files_stamp(Path(args.model)) if local_model else None,
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers_path = out / ANSWERS_FILE
    answers = read_answers(answers_path, questions, settings, model_id)
    todo = [q for q in questions if q.key not in answers]
    if todo:
        _answer(args, todo, images_dir, settings, model_id, answers_path, answers, len(questions))
    upload = submission(record, questions, answers, mode)
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
    """``score``: the metrics of a predictions file against the gold of the question/annotation files."""
    record, mode = benchmark_record(args.benchmark, args.mode)
    if not args.questions and not args.annotations:
        raise BadInput("pass --annotations (or --questions with gold answers inside) to score against")
    questions, skipped = load_benchmark(record, args.questions or (), args.annotations or ())
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


# ---- scoring and reporting -----------------------------------------------------------------------


def evaluate(
    benchmark: str, questions: Sequence[Question], predictions: dict[str, str], mode: str | None
) -> dict:
    """The benchmark's scores of ``predictions`` (key -> text) on ``questions``, which must all have gold."""
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
    golds = [Gold(q.key, q.gold, q.categories) for q in questions]
    try:
        return score_benchmark(benchmark, golds, predictions, mode)
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
    benchmark: Benchmark, questions: Sequence[Question], answers: dict[str, str], mode: str
) -> list | None:
    """Answers in the benchmark's upload format, processed as the chosen mode's tool would upload them;
    None where the benchmark is scored from the answers JSONL itself (POPE, ScienceQA, panels)."""
    if benchmark.upload is None:
        return None
    return benchmark.upload([q for q in questions if q.key in answers], answers, mode)


# ---- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The ``run`` or ``score`` command line; a bad one raises ``vlm.cli.UsageError`` (one line)."""
    # --verbose belongs to each command (``run ... --verbose``): a subcommand's default would reset it
    parser = ArgumentParser(
        prog="python -m eval.vqa",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        verbose_flag=False,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    common = {"choices": tuple(BENCHMARKS), "required": True}

    run_p = commands.add_parser("run", help="answer a benchmark with a model, then score it")
    run_p.add_argument(
        "--model", default=str(DEMO_MODEL), help="model folder or hub id (default: models/demo)"
    )
    run_p.add_argument("--benchmark", **common)
    run_p.add_argument("--questions", nargs="+", required=True, help="question file(s); POPE: one per split")
    run_p.add_argument("--images", help="image folder (default: the folder of the first questions file)")
    run_p.add_argument("--annotations", nargs="+", help="gold answers, where the question file has none")
    run_p.add_argument(
        "--out", required=True, help="output folder: answers.jsonl, submission.json, metrics.json"
    )
    run_p.add_argument(
        "--mode", choices=ALL_MODES, help="scoring mode (default: the one LLaVA-1.5's numbers use)"
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
    score_p.add_argument(
        "--mode",
        choices=ALL_MODES,
        help="; ".join(f"{b.name}: {' | '.join(b.modes)}" for b in BENCHMARKS.values() if len(b.modes) > 1),
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        set_verbosity(args.verbose)
        result = run(args) if args.command == "run" else score_files(args)
    except (BadInput, UsageError) as error:
        print(f"eval.vqa: error: {error}", file=sys.stderr)
        return 2
    if result is not None:
        _warn_counts(result)
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
