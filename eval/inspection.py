"""Inspection evaluation: each capability of a report scored on its own, with n and a 95% interval.

    python -m eval.inspection --model M --data DIR [--limit N] [--out OUT]

DIR is a ``python -m vlm.synth`` folder; its ``meta.jsonl`` holds each panel's true report. Every panel
gets a schema-constrained report (``vlm.report``), and ``score_reports(gold, predicted)`` - a pure
function - scores them:

- damage detection precision / recall / F1, per damage type and overall, matching a predicted item to
  a gold one of the same type (``type``) or of the same type and location (``type_location``); each
  gold or predicted item matches at most once;
- asset code exact match and character error rate; lamp-state accuracy (each gold lamp, found by its
  label; a lamp the report misses is wrong); gauge mean absolute error; severity and action accuracy;
- the schema-validity rate, and the false-damage rate on clean panels (gold damage empty, some predicted).

A panel without a valid report counts as wrong everywhere: no match, CER 100%, gauge error 100 (the
whole scale), a false alarm on a clean panel. Rates are percentages; intervals come from
``eval.stats.bootstrap_interval`` over the scored units (panels, lamps, or damage items), so P/R/F1
intervals resample items. F1 is the mean of the match indicators of all gold and predicted items, which
equals 2TP / (2TP + FP + FN). Writes ``OUT/metrics.json``, ``OUT/reports.jsonl`` (the reports scored)
and, with ``--save-to-model``, ``<model>/results/inspection.json``. Quiet by default; ``--verbose`` shows
the libraries' loading bars and warnings.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from eval.scoring import edit_distance
from eval.stats import bootstrap_interval
from vlm.cli import ArgumentParser, UsageError, set_verbosity
from vlm.files import write_atomic

GAUGE_SPAN = 100  # a missing gauge reading counts as the whole scale wrong
MATCHES = {"type": ("type",), "type_location": ("type", "location")}
BASIC = {  # name -> (label in the table, unit)
    "schema_valid": ("schema-valid reports", "%"),
    "asset_code_exact": ("asset code exact match", "%"),
    "asset_code_cer": ("asset code character error rate", "%"),
    "lamp_state_accuracy": ("lamp state accuracy", "%"),
    "gauge_mae": ("gauge mean absolute error", "gauge units"),
    "severity_accuracy": ("overall severity accuracy", "%"),
    "action_accuracy": ("recommended action accuracy", "%"),
    "false_damage_rate_clean": ("false-damage rate on clean panels", "%"),
}


def _metric(scores: Sequence[float], unit: str) -> dict:
    scale = 100.0 if unit == "%" else 1.0
    low, high = bootstrap_interval(scores, n_resamples=1000, seed=0, confidence=0.95)
    value = scale * sum(scores) / len(scores) if scores else 0.0
    return {"value": round(value, 2), "interval": [round(scale * low, 2), round(scale * high, 2)], "n": len(scores),
            "unit": unit}


def _matched(gold: list[dict], pred: list[dict], keys: tuple[str, ...]) -> tuple[list[bool], list[bool]]:
    """Which gold and which predicted damage items have a partner with the same ``keys``."""
    gold_hit, pred_hit = [False] * len(gold), [False] * len(pred)
    for i, item in enumerate(gold):
        for j, other in enumerate(pred):
            if not pred_hit[j] and all(item[k] == other[k] for k in keys):
                gold_hit[i] = pred_hit[j] = True
                break
    return gold_hit, pred_hit


def score_reports(gold: Sequence[dict], predicted: Sequence[dict | None],
                  damage_types: Sequence[str] | None = None) -> dict[str, dict]:
    """Every metric as ``{"value", "interval", "n", "unit"}``; ``None`` in ``predicted`` is a missing report.

    Damage metrics are named ``damage.<match>.<type or overall>.<precision|recall|f1>``; per-type rows
    are made for ``damage_types`` (default: the types seen in gold or predictions, sorted).
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold reports but {len(predicted)} predictions")
    scores: dict[str, list[float]] = {name: [] for name in BASIC}
    # (match, type) -> (recall indicators over gold items, precision indicators over predicted items)
    hits: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for truth, report in zip(gold, predicted, strict=True):
        valid = report is not None
        pred = report or {}
        code = pred.get("asset_code", "")
        scores["schema_valid"].append(float(valid))
        scores["asset_code_exact"].append(float(valid and code == truth["asset_code"]))
        scores["asset_code_cer"].append(edit_distance(code, truth["asset_code"]) / max(1, len(truth["asset_code"])))
        lamps = {}
        for lamp in pred.get("lamps", []):
            lamps.setdefault(lamp["label"], lamp["on"])
        scores["lamp_state_accuracy"] += [float(lamps.get(lamp["label"]) == lamp["on"]) for lamp in truth["lamps"]]
        scores["gauge_mae"].append(abs(pred["gauge_reading"] - truth["gauge_reading"]) if valid else GAUGE_SPAN)
        scores["severity_accuracy"].append(float(valid and pred["overall_severity"] == truth["overall_severity"]))
        scores["action_accuracy"].append(float(valid and pred["recommended_action"] == truth["recommended_action"]))
        if not truth["damage"]:
            scores["false_damage_rate_clean"].append(float(not valid or bool(pred["damage"])))
        for match, keys in MATCHES.items():
            gold_hit, pred_hit = _matched(truth["damage"], pred.get("damage", []), keys)
            for items, flags, side in ((truth["damage"], gold_hit, 0), (pred.get("damage", []), pred_hit, 1)):
                for item, flag in zip(items, flags, strict=True):
                    for kind in (item["type"], "overall"):
                        hits.setdefault((match, kind), ([], []))[side].append(float(flag))
    metrics = {name: _metric(values, BASIC[name][1]) for name, values in scores.items()}
    kinds = sorted({kind for _, kind in hits} - {"overall"}) if damage_types is None else list(damage_types)
    for match in MATCHES:
        for kind in ["overall", *kinds]:
            recall, precision = hits.get((match, kind), ([], []))
            for stat, values in (("precision", precision), ("recall", recall), ("f1", recall + precision)):
                metrics[f"damage.{match}.{kind}.{stat}"] = _metric(values, "%")
    return metrics


def _cell(metric: dict) -> str:
    low, high = metric["interval"]
    return f"{metric['value']:.2f} [{low:.2f}, {high:.2f}]"


def format_table(metrics: dict[str, dict]) -> str:
    """The metrics as two Markdown tables (readable in a terminal, pasteable into a README)."""
    lines = ["| metric | value [95% interval] | n |", "|---|---:|---:|"]
    for name, (label, unit) in BASIC.items():
        lines.append(f"| {label} ({unit}) | {_cell(metrics[name])} | {metrics[name]['n']} |")
    lines += ["", "| damage detection (%) | precision | recall | F1 | gold items | predicted items |",
              "|---|---:|---:|---:|---:|---:|"]
    for match in MATCHES:
        kinds = sorted({name.split(".")[2] for name in metrics if name.startswith(f"damage.{match}.")} - {"overall"})
        for kind in ["overall", *kinds]:
            precision, recall, f1 = (metrics[f"damage.{match}.{kind}.{stat}"] for stat in ("precision", "recall", "f1"))
            lines.append(f"| {match.replace('_', ' + ')}: {kind} | {_cell(precision)} | {_cell(recall)} | "
                         f"{_cell(f1)} | {recall['n']} | {precision['n']} |")
    return "\n".join(lines)


class BadInput(Exception):
    """Bad command-line input or data, shown as one line."""


def read_panels(data: Path, limit: int | None) -> list[dict]:
    """The panels of a ``vlm.synth`` folder: ``{"id", "image", "report"}`` from ``meta.jsonl``."""
    meta = data / "meta.jsonl"
    if not meta.is_file():
        raise BadInput(f"{meta} not found: --data takes a folder written by python -m vlm.synth")
    panels = []
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            panels.append({"id": record["id"], "image": record["image"], "report": record["report"]})
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise BadInput(f"{meta} line {number}: not a panel record ({type(error).__name__}: {error})") from None
        if limit is not None and len(panels) == limit:
            break
    if not panels:
        raise BadInput(f"{meta} holds no panels")
    return panels


def predict(model_name: str, data: Path, panels: list[dict], batch_size: int, device: str) -> list[dict]:
    """One record per panel: ``{"id", "image", "report" (None if none is valid), "error"}``."""
    from vlm.images import ImageError, load_image
    from vlm.loading import load_pretrained
    from vlm.report import ReportError, ReportGenerator

    try:
        generator = ReportGenerator(*load_pretrained(model_name, device=device))
    except (FileNotFoundError, ValueError, OSError) as error:
        raise BadInput(f"cannot load model {model_name}: {error}") from None
    records = []
    for start in tqdm(range(0, len(panels), batch_size), desc="reports", unit="batch"):
        batch, images = [], []
        for panel in panels[start:start + batch_size]:
            record = {"id": panel["id"], "image": panel["image"], "report": None, "error": None}
            records.append(record)
            try:
                images.append(load_image(data / panel["image"]))
                batch.append(record)
            except ImageError as error:
                record["error"] = str(error)
        if not batch:
            continue
        for record, text in zip(batch, generator.generate_texts(images), strict=True):
            try:
                record["report"] = generator.parse(text)
            except ReportError as error:
                record["error"] = str(error)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m eval.inspection", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="project model folder, hub id or Llava folder")
    parser.add_argument("--data", type=Path, required=True, help="a python -m vlm.synth folder")
    parser.add_argument("--limit", type=int, help="score the first N panels only")
    parser.add_argument("--out", type=Path, default=Path("runs/inspection"), help="where metrics.json goes")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-to-model", action="store_true",
                        help="also write <model>/results/inspection.json (a local model folder)")
    try:
        args = parser.parse_args(argv)
        set_verbosity(args.verbose)
        if args.limit is not None and args.limit < 1:
            raise BadInput(f"--limit must be at least 1, got {args.limit}")
        if args.batch_size < 1:
            raise BadInput(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.save_to_model and not Path(args.model).is_dir():
            raise BadInput(f"--save-to-model needs a local model folder, not {args.model}")
        panels = read_panels(args.data, args.limit)
        records = predict(args.model, args.data, panels, args.batch_size, args.device)
    except (BadInput, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from vlm.inspection import DAMAGE_TYPES, REPORT_SCHEMA

    metrics = score_reports([p["report"] for p in panels], [r["report"] for r in records], DAMAGE_TYPES)
    failed = [r for r in records if r["error"]]
    for record in failed[:5]:
        print(f"warning: {record['id']}: {record['error']}", file=sys.stderr)
    if failed:
        print(f"warning: {len(failed)} of {len(records)} panels have no valid report (scored as wrong)",
              file=sys.stderr)
    result = {"benchmark": "inspection", "model": args.model, "data": str(args.data), "n": len(panels),
              "schema": REPORT_SCHEMA["$id"], "failed": [r["id"] for r in failed], "metrics": metrics}
    print(format_table(metrics))
    text = json.dumps(result, indent=2) + "\n"
    write_atomic(args.out / "metrics.json", text)
    write_atomic(args.out / "reports.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if args.save_to_model:  # only when asked: the model folder's results may be committed files
        write_atomic(Path(args.model) / "results" / "inspection.json", text)
    print(f"wrote {args.out / 'metrics.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
