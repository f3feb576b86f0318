"""``vlm-report IMAGES_DIR --out OUT_DIR [--model M]``: inspection reports for a folder of images.

Writes ``reports.jsonl`` (one record per image, appended as it goes), ``reports.csv`` and ``index.html``
(a thumbnail beside each report, flagged panels first) in OUT_DIR. A rerun skips every image whose
report is already there for the same file content (SHA-256) and model; an image that fails is recorded
with its error, the rest go on, and a rerun tries it again. A record cut off by a crash is removed before
the rerun appends; every other file is written whole or not at all (a temporary file renamed over it).
``vlm-report --schema`` prints the report schema. ``python -m vlm.report`` is the same command.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import io
import json
import sys
from pathlib import Path

from tqdm import tqdm

from vlm.cli import (
    DEMO_MODEL,
    ArgumentParser,
    UsageError,
    fail,
    one_line,
    require_model_folder,
    set_verbosity,
)
from vlm.files import write_atomic
from vlm.inspection import REPORT_SCHEMA, SEVERITIES
from vlm.report import ReportError, ReportGenerator

DEFAULT_MODEL = DEMO_MODEL  # the checkout's models/demo
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
THUMB_PX = 160
CSV_FIELDS = ("image", "status", "flagged", "asset_code", "overall_severity", "recommended_action", "gauge_reading",
              "warning_label", "lamps", "damage", "notes", "error")


def is_flagged(report: dict) -> bool:
    """A report that needs someone's attention: any damage, or a severity above none."""
    return bool(report["damage"]) or report["overall_severity"] != "none"


def read_records(path: Path) -> dict[str, dict]:
    """The records of ``reports.jsonl`` by image; a later line for the same image replaces an earlier one."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):  # bytes: one bad line spoils no other
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            records[record["image"]] = record
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            print(f"warning: {path} line {number} is not a report record; its image will be redone", file=sys.stderr)
    return records


def repair_log(path: Path) -> None:
    """Cut a last line left without its newline by a crash, so the next record starts on a line of its own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        print(f"warning: {path}: removing the cut-off last line of an interrupted run", file=sys.stderr)
        write_atomic(path, data[: data.rfind(b"\n") + 1])


def _row(record: dict) -> dict:
    report = record["report"] or {}
    row = {"image": record["image"], "status": "failed" if record["error"] else "ok", "error": record["error"] or "",
           "flagged": record["flagged"], **{k: report.get(k, "") for k in CSV_FIELDS[3:11]}}
    if report:
        row["lamps"] = "; ".join(f"{x['label']}({x['colour']})={'on' if x['on'] else 'off'}" for x in report["lamps"])
        row["damage"] = "; ".join(f"{x['type']}@{x['location']}({x['severity']})" for x in report["damage"])
    return row


def write_csv(records: list[dict], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(_row(record) for record in records)
    write_atomic(path, text.getvalue())


def html_order(record: dict) -> tuple:
    """Flagged reports first, most severe first; then failed images; then clean panels."""
    if record["error"]:
        return (1, 0, record["image"])
    if record["flagged"]:
        return (0, -SEVERITIES.index(record["report"]["overall_severity"]), record["image"])
    return (2, 0, record["image"])


def write_html(records: list[dict], path: Path) -> None:
    """One page: each image's thumbnail beside its report, in ``html_order``, coloured by severity."""
    rows = []
    for record in sorted(records, key=html_order):
        row, esc = _row(record), html.escape
        thumb = (f'<img src="{esc(record["thumbnail"])}" alt="">' if record.get("thumbnail")
                 and (path.parent / record["thumbnail"]).is_file() else "")
        if record["error"]:
            body, cls = f'<p class="error">failed: {esc(record["error"])}</p>', "failed"
        else:
            cls = f"sev-{record['report']['overall_severity']}"
            fields = [(k.replace("_", " "), row[k]) for k in CSV_FIELDS[3:11]]
            body = "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(str(v)) or '-'}</dd>" for k, v in fields) + "</dl>"
        rows.append(f'<tr class="{cls}"><td>{thumb}</td><td><h3>{esc(record["image"])}</h3>{body}</td></tr>')
    flagged = sum(bool(r["flagged"]) for r in records)
    failed = sum(bool(r["error"]) for r in records)
    write_atomic(path, f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Inspection reports</title><style>
body {{ font-family: sans-serif; margin: 2em; }} td {{ vertical-align: top; padding: 8px; }}
tr {{ border-left: 8px solid #ccc; }} table {{ border-collapse: collapse; }} h3 {{ margin: 0 0 4px; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 2px 12px; margin: 0; }} dt {{ color: #555; }}
dd {{ margin: 0; max-width: 60em; overflow-wrap: anywhere; }}
.sev-critical {{ border-left-color: #8b0000; }} .sev-high {{ border-left-color: #e53935; }}
.sev-medium {{ border-left-color: #fb8c00; }} .sev-low {{ border-left-color: #fdd835; }}
.sev-none {{ border-left-color: #43a047; }} .failed {{ border-left-color: #555; }} .error {{ color: #b00; }}
</style></head><body>
<h1>Inspection reports</h1>
<p>{len(records)} images: {flagged} flagged, {failed} failed, {len(records) - flagged - failed} clean.
Schema {html.escape(REPORT_SCHEMA["$id"])}.</p>
<table>
{chr(10).join(rows)}
</table></body></html>
""")


def _load_model(name: str, device: str, dtype: str | None):
    from vlm.loading import LOAD_ERRORS, load_pretrained

    require_model_folder(name, DEFAULT_MODEL)
    try:
        return load_pretrained(name, device=device, dtype=dtype)
    except LOAD_ERRORS as error:  # vlm.loading.ModelFolderError (a ValueError) names the broken file
        raise UsageError(f"cannot load model {name}: {one_line(error)}") from None


def _report_batch(generator: ReportGenerator, records: list[dict], images: list) -> None:
    """Fill in the report (or the error) of each record; a batch that cannot be generated fails each image."""
    try:
        texts = generator.generate_texts(images)
    except Exception as error:  # one bad batch must not stop the run
        for record in records:
            record["error"] = f"{type(error).__name__}: {error}"
        return
    for record, text in zip(records, texts, strict=True):
        try:
            record["report"] = generator.parse(text)
            record["flagged"] = is_flagged(record["report"])
        except ReportError as error:
            record["error"] = str(error)


def run(images_dir: Path, out: Path, model_name: str, batch_size: int = 4, device: str = "cpu",
        dtype: str | None = None) -> dict[str, int]:
    """Report every image of ``images_dir`` that ``out`` holds no record of for this content and model.

    Returns the counts done, skipped, failed and ignored (files whose suffix is not an image's).
    """
    from vlm.images import ImageError, load_image

    log = out / "reports.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    repair_log(log)
    records = read_records(log)
    inside = out.resolve()  # OUT_DIR may sit inside IMAGES_DIR: its thumbnails are not inputs
    found = sorted(p for p in images_dir.rglob("*") if p.is_file() and inside not in p.resolve().parents)
    files = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
    pending = []
    for path in files:
        name, digest = path.relative_to(images_dir).as_posix(), hashlib.sha256(path.read_bytes()).hexdigest()
        done = records.get(name, {})
        if (done.get("sha256"), done.get("model")) != (digest, model_name) or done.get("error"):
            pending.append((name, digest, path))  # new, changed, another model's, or failed last time
    counts = {"done": 0, "skipped": len(files) - len(pending), "failed": 0, "ignored": len(found) - len(files)}
    generator = ReportGenerator(*_load_model(model_name, device, dtype)) if pending else None
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle, tqdm(total=len(pending), desc="reports", unit="image") as bar:
        for start in range(0, len(pending), batch_size):
            batch, loaded, images = [], [], []
            for name, digest, path in pending[start:start + batch_size]:
                record = {"image": name, "sha256": digest, "report": None, "error": None, "flagged": None,
                          "thumbnail": None, "schema": REPORT_SCHEMA["$id"], "model": str(model_name)}
                batch.append(record)
                try:
                    image = load_image(path)
                except ImageError as error:
                    record["error"] = str(error)
                    continue
                thumb = image.copy()
                thumb.thumbnail((THUMB_PX, THUMB_PX))
                record["thumbnail"] = f"thumbs/{digest[:16]}.jpg"
                encoded = io.BytesIO()
                thumb.save(encoded, format="JPEG", quality=85)
                write_atomic(out / record["thumbnail"], encoded.getvalue())
                loaded.append(record)
                images.append(image)
            if loaded:
                _report_batch(generator, loaded, images)
            for record in batch:
                counts["failed" if record["error"] else "done"] += 1
                records[record["image"]] = record
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            bar.update(len(batch))
    ordered = [records[name] for name in sorted(records)]
    write_csv(ordered, out / "reports.csv")
    write_html(ordered, out / "index.html")
    return counts


def main(argv: list[str] | None = None) -> int:
    """The ``vlm-report`` command; returns the exit status (2: bad input, said in one line on stderr)."""
    parser = ArgumentParser(prog="vlm-report", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="?", type=Path, metavar="IMAGES_DIR", help="searched recursively")
    parser.add_argument("--out", type=Path, metavar="OUT_DIR", help="output folder (created)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="project model folder, hub id or Llava folder (default: models/demo)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    parser.add_argument("--schema", action="store_true", help="print the report JSON Schema and exit")
    try:
        args = parser.parse_args(argv)
        set_verbosity(args.verbose)
        if args.schema:
            print(json.dumps(REPORT_SCHEMA, indent=2))
            return 0
        if args.images is None or args.out is None:
            raise UsageError("give IMAGES_DIR and --out OUT_DIR (or --schema)")
        if not args.images.is_dir():
            raise UsageError(f"{args.images} is not a folder{' (a file: give IMAGES_DIR)' if args.images.is_file() else ''}")
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} exists and is not a folder")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        counts = run(args.images, args.out, args.model, args.batch_size, args.device, args.dtype)
    except UsageError as error:
        return fail(error)
    ignored = f", ignored {counts['ignored']} files that are not images" if counts["ignored"] else ""
    print(f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']}{ignored}; "
          f"wrote {args.out / 'reports.jsonl'}, reports.csv, index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
