"""Zero-shot triage on vlm.synth panels with the tower's own text half, beside the VLM's answers to the same questions.

    python -m eval.zeroshot --panels DIR [--model models/demo] [--tower T] [--vlm-results metrics.json] --out OUT

DIR is a ``python -m vlm.synth`` folder. Its damage, lamp and warning questions (questions.jsonl) are each
turned into a set of written labels, one per possible answer, filled into ``--template``; the tower's best
label is its answer. Capabilities: ``damage_present`` (is the asked cell damaged), ``damage_type`` (which
damage, over the damaged cells), ``lamp`` (the named lamp on or off) and ``warning`` (a warning label or
none), each with a 95% bootstrap interval. The VLM's numbers for the same questions come from eval.vqa's
``metrics.json`` (``--vlm-results``) or from running it (``OUT/vlm``): what the projector and LM add over
the bare tower. Writes ``OUT/zeroshot.json`` (``--save-to-model``: also ``<model>/results/zeroshot.json``).
Quiet by default; ``--verbose`` shows the libraries' loading bars and warnings.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from eval.stats import bootstrap_interval
from vlm.cli import DEMO_MODEL, ArgumentParser, UsageError, set_verbosity
from vlm.files import write_atomic
from vlm.images import ImageError, load_image
from vlm.inspection import DAMAGE_TYPES, LAMP_LABELS, LOCATIONS, NOUN
from vlm.zeroshot import BATCH, ZeroShotError, check_templates, load_zero_shot

TEMPLATE = "an equipment panel with {}."  # the labels below read as the panels' captions do
CAPABILITIES = ("damage_present", "damage_type", "lamp", "warning")
CATEGORIES = ("damage", "lamp", "warning")  # the questions the tower can be asked
RESULTS_FILE = "zeroshot.json"


class BadInput(Exception):
    """A problem with the command's inputs, reported in one line."""


def choices(question: dict) -> list[tuple[str, str]]:
    """(answer, label) for every answer the question allows: the label states that answer about the panel."""
    text, category = question["text"], question["category"]
    if category == "damage":  # the longest name found: "top-center" holds "center"
        where = max((loc for loc in LOCATIONS if loc in text), key=len, default=None)
        if where is None:
            raise BadInput(f"damage question {question['question_id']} names no cell ({', '.join(LOCATIONS)})")
        return [(kind, f"{NOUN[kind]} at the {where}") for kind in DAMAGE_TYPES] + [
            ("none", f"no damage at the {where}")]
    if category == "lamp":
        lamp = next((name for name in LAMP_LABELS if re.search(rf"\b{name}\b", text)), None)
        if lamp is None:
            raise BadInput(f"lamp question {question['question_id']} names no lamp ({', '.join(LAMP_LABELS)})")
        return [("on", f"the {lamp} lamp on"), ("off", f"the {lamp} lamp off")]
    return [("yes", "a warning label"), ("no", "no warning label")]


def read_questions(panels: Path, limit: int | None) -> list[dict]:
    """The damage, lamp and warning questions of the folder's first ``limit`` panels, in file order."""
    file = panels / "questions.jsonl"
    if not file.is_file():
        raise BadInput(f"{file} does not exist: --panels must be a `python -m vlm.synth` folder")
    questions, images = [], set()
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keys = {key: record[key] for key in ("question_id", "image", "text", "answer", "category")}
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise BadInput(f"{file} line {number} is not a vlm.synth question "
                           f"({type(error).__name__}: {error})") from None
        images.add(keys["image"])
        if limit is not None and len(images) > limit:
            break
        if keys["category"] in CATEGORIES:
            questions.append(keys)
    if not questions:
        raise BadInput(f"{file} holds no damage, lamp or warning questions")
    return questions


def summary(scores: list[float]) -> dict:
    low, high = bootstrap_interval(scores)
    return {"n": len(scores), "value": round(100 * sum(scores) / max(1, len(scores)), 2),
            "interval": [round(100 * low, 2), round(100 * high, 2)]}


@torch.no_grad()
def zero_shot_scores(scorer, panels: Path, questions: list[dict], template: str) -> dict[str, dict]:
    """Per capability, the tower's best label against the gold answer, as eval.scoring scores the VLM's."""
    paths = sorted({q["image"] for q in questions})
    try:  # a batch of panels at a time, not all of them in memory
        image_embeds = torch.cat([scorer.embed_images([load_image(panels / path) for path in paths[start:start + BATCH]])
                                  for start in range(0, len(paths), BATCH)])
    except ImageError as error:
        raise BadInput(str(error)) from None
    row = {path: i for i, path in enumerate(paths)}
    options = [choices(q) for q in questions]
    texts = sorted({label for option in options for _, label in option})
    column = {text: i for i, text in enumerate(texts)}
    logits = scorer.logits(image_embeds, scorer.embed_labels(texts, [template]))
    hits: dict[str, list[float]] = {name: [] for name in CAPABILITIES}
    for question, option in zip(questions, options, strict=True):
        scores = logits[row[question["image"]], [column[label] for _, label in option]]
        said, gold = option[int(scores.argmax())][0], question["answer"].strip().lower()
        if question["category"] == "damage":  # as eval.scoring's damage_presence / damage_type_accuracy
            hits["damage_present"].append(float((said == "none") == (gold == "none")))
            if gold != "none":
                hits["damage_type"].append(float(said == gold))
        else:
            hits[question["category"]].append(float(said == gold))
    return {name: summary(values) for name, values in hits.items()}


def vlm_scores(metrics: dict, where: str) -> dict[str, dict]:
    """The same capabilities from eval.vqa's panels metrics."""
    try:
        if metrics["benchmark"] != "panels":
            raise BadInput(f"{where} scores {metrics['benchmark']!r}, not the panels benchmark")
        per_category, extra = metrics["per_category"]["category"], metrics["extra"]
        found = {"damage_present": extra["damage_presence_accuracy"], "damage_type": extra["damage_type_accuracy"],
                 "lamp": per_category["lamp"], "warning": per_category["warning"]}
        return {name: {key: entry[key] for key in ("n", "value", "interval")} for name, entry in found.items()}
    except (KeyError, TypeError) as error:
        raise BadInput(f"{where} is not eval.vqa panels metrics (no {error})") from None


def run_vlm(args: argparse.Namespace, questions: list[dict], out: Path) -> tuple[dict, str]:
    """Answer the same questions with the VLM through eval.vqa; its metrics and where they are."""
    from eval import vqa

    out.mkdir(parents=True, exist_ok=True)
    asked = out / "questions.jsonl"
    write_atomic(asked, "".join(json.dumps(q) + "\n" for q in questions))
    vqa_args = vqa.parse_args(["run", "--model", str(args.model), "--benchmark", "panels", "--questions", str(asked),
                               "--images", str(args.panels), "--out", str(out / "vlm"),
                               "--max-new-tokens", str(args.max_new_tokens), "--device", args.device])
    try:
        return vqa.run(vqa_args), str(out / "vlm" / vqa.METRICS_FILE)
    except vqa.BadInput as error:
        raise BadInput(f"the VLM's run: {error}") from None


def read_vlm_results(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"--vlm-results {file} does not exist")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInput(f"--vlm-results {file} is not valid JSON: {error}") from None


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    panels, out = Path(args.panels), Path(args.out)
    if not panels.is_dir():
        raise BadInput(f"--panels {panels} is not a folder")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    if args.limit is not None and args.limit < 1:
        raise BadInput("--limit must be at least 1")
    if args.save_to_model and not Path(args.model).is_dir():
        raise BadInput(f"--save-to-model needs a local model folder, not {args.model}")
    check_templates([args.template])
    questions = read_questions(panels, args.limit)
    scorer = load_zero_shot(args.tower or args.model, args.activation, args.device)  # before the VLM's long run
    zero_shot = zero_shot_scores(scorer, panels, questions, args.template)
    if args.vlm_results:
        metrics, vlm_source = read_vlm_results(args.vlm_results), str(args.vlm_results)
    else:
        metrics, vlm_source = run_vlm(args, questions, out)
    vlm = vlm_scores(metrics, vlm_source)
    for name in CAPABILITIES:  # the same panels and questions, or the comparison means nothing
        if vlm[name]["n"] != zero_shot[name]["n"]:
            raise BadInput(f"{vlm_source} has {vlm[name]['n']} {name} answers, these panels {zero_shot[name]['n']}: "
                           "give the VLM's results on the same questions (or leave --vlm-results out to run it)")
    result = {
        "benchmark": "panels_zero_shot", "panels": str(panels), "limit": args.limit,
        "tower": scorer.source, "activation": scorer.activation, "template": args.template,
        "model": metrics.get("model") or str(args.model), "vlm_results": vlm_source,
        "capabilities": {name: {"zero_shot": zero_shot[name], "vlm": vlm[name]} for name in CAPABILITIES},
    }
    text = json.dumps(result, indent=2) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RESULTS_FILE, text)
    if args.save_to_model:  # only when asked: a model folder's results may be committed files
        write_atomic(Path(args.model) / "results" / RESULTS_FILE, text)
    return result


def table(result: dict) -> str:
    """Markdown: each capability, the bare tower's accuracy and the VLM's, with their intervals."""
    def cell(entry: dict) -> str:
        return f"{entry['value']:.1f} [{entry['interval'][0]:.1f}, {entry['interval'][1]:.1f}]"
    rows = ["| capability | questions | zero-shot tower | VLM |", "|---|---:|---:|---:|"]
    for name, entry in result["capabilities"].items():
        rows.append(f"| {name} | {entry['zero_shot']['n']} | {cell(entry['zero_shot'])} | {cell(entry['vlm'])} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; a bad one raises ``vlm.cli.UsageError`` (one line)."""
    parser = ArgumentParser(prog="python -m eval.zeroshot", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panels", required=True, help="a `python -m vlm.synth` folder")
    parser.add_argument("--model", default=str(DEMO_MODEL), help="the VLM (default: models/demo)")
    parser.add_argument("--tower", help="whole CLIP/SigLIP checkpoint (default: the model's vision_tower)")
    parser.add_argument("--vlm-results", help="eval.vqa's metrics.json for these panels (default: run the VLM)")
    parser.add_argument("--out", required=True, help="output folder: zeroshot.json (and vlm/ when the VLM runs)")
    parser.add_argument("--limit", type=int, help="only the first N panels")
    parser.add_argument("--template", default=TEMPLATE, help=f"where each label goes (default: {TEMPLATE!r})")
    parser.add_argument("--activation", choices=("softmax", "sigmoid"), help="override the tower's own")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the VLM's answers (as eval.vqa)")
    parser.add_argument("--save-to-model", action="store_true", help="also write <model>/results/zeroshot.json")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        set_verbosity(args.verbose)
        result = evaluate(args)
    except (BadInput, UsageError, ZeroShotError) as error:
        print(f"eval.zeroshot: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:  # a broken model folder (vlm.loading.ModelFolderError is a ValueError)
        print(f"eval.zeroshot: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
              file=sys.stderr)
        return 2
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
