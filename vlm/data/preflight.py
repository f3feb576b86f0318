"""Check every record before training: images open, ``<image>`` count matches, roles alternate, it fits.

``python -m vlm.data check --config CONFIG`` prints the report; training runs the same check, refuses to
start above ``data.max_bad_fraction`` and writes the ids it skips to ``skipped_records.jsonl``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from vlm.config import DataConfig
from vlm.data.formats import DataError, Record, open_record_image
from vlm.data.templates import SampleError, encode
from vlm.images import ImageError
from vlm.processor import VLMProcessor

SHOWN_IDS = 5
SKIPPED_FILE = "skipped_records.jsonl"


@dataclass
class PreflightReport:
    total: int
    lengths: dict[int, int] = field(default_factory=dict)  # record index -> tokens (visual included), good ones
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))  # kind -> (id, why)

    @property
    def bad_ids(self) -> set[str]:
        return {record_id for found in self.problems.values() for record_id, _ in found}

    def format(self) -> str:
        bad = len(self.bad_ids)
        lines = [f"preflight: {self.total} records, {self.total - bad} good, {bad} bad"]
        for kind, found in sorted(self.problems.items()):
            shown = ", ".join(record_id for record_id, _ in found[:SHOWN_IDS])
            more = f", ... {len(found) - SHOWN_IDS} more" if len(found) > SHOWN_IDS else ""
            lines.append(f"  {kind}: {len(found)} (ids: {shown}{more}); first: {found[0][1]}")
        return "\n".join(lines)


def check_roles(record: Record) -> None:
    messages = record.messages
    if not messages:
        raise SampleError("bad_roles", "no conversation turns")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise SampleError("bad_roles", f"turn {index} is {message['role']!r} where {expected!r} was expected "
                                           "(turns must alternate human/gpt, starting with human)")
        if not isinstance(message["content"], str):
            raise SampleError("bad_roles", f"turn {index} has no text value")
    if not turns or turns[-1]["role"] != "assistant":
        raise SampleError("bad_roles", "the conversation does not end with a gpt turn")


def check_placeholders(record: Record, image_token: str) -> None:
    in_replies = sum(m["content"].count(image_token) for m in record.messages if m["role"] == "assistant")
    if in_replies:
        raise SampleError("image_count_mismatch", f"{image_token} appears in a gpt turn")
    placeholders = sum(m["content"].count(image_token) for m in record.messages)
    if placeholders != len(record.images):
        raise SampleError("image_count_mismatch", f"{placeholders} {image_token} placeholder(s) but "
                                                  f"{len(record.images)} image(s)")


def check_images(record: Record, image_folder: str) -> None:
    for image in record.images:
        try:
            open_record_image(image, image_folder)
        except ImageError as error:
            kind = "missing_image" if "does not exist" in str(error) else "corrupt_image"
            raise SampleError(kind, str(error)) from None


def check_record(record: Record, processor: VLMProcessor, data: DataConfig) -> int:
    """Raise :class:`SampleError` naming the first problem of a record; return its length in tokens."""
    check_roles(record)
    check_placeholders(record, processor.image_token)
    check_images(record, data.image_folder)
    ids, _ = encode(record.messages, processor.tokenizer, data.template, processor.image_token,
                    processor.tokens_per_image, data.max_length,
                    "truncate" if data.on_too_long == "truncate" else "skip")
    return len(ids)


def check_records(records: list[Record], processor: VLMProcessor, data: DataConfig,
                  threads: int = 4) -> PreflightReport:
    report = PreflightReport(total=len(records))
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            report.problems["duplicate_id"].append((record.id, f"id {record.id} is used by more than one record"))
        seen.add(record.id)

    def one(index: int) -> tuple[int, int | SampleError]:
        try:
            return index, check_record(records[index], processor, data)
        except SampleError as error:
            return index, error

    # Image decoding releases the GIL, so a few threads make the check several times faster.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(one, range(len(records)))
        for index, outcome in tqdm(results, total=len(records), desc="preflight", unit="record", leave=False):
            if isinstance(outcome, SampleError):
                report.problems[outcome.problem].append((records[index].id, str(outcome)))
            else:
                report.lengths[index] = outcome
    return report


def enforce(report: PreflightReport, max_bad_fraction: float, output_dir: str | Path | None,
            on_too_long: str = "skip") -> set[str]:
    """Refuse to train over too many bad records; otherwise write the skipped ids and return them."""
    if on_too_long == "error" and report.problems.get("too_long"):
        raise DataError(f"{len(report.problems['too_long'])} record(s) exceed data.max_length and "
                        f"data.on_too_long=error (first: {report.problems['too_long'][0][0]})")
    bad = report.bad_ids
    if report.total and len(bad) / report.total > max_bad_fraction:
        raise DataError(f"{len(bad)} of {report.total} records are bad ({100 * len(bad) / report.total:.1f}%), above "
                        f"data.max_bad_fraction={max_bad_fraction}: fix them or raise the limit (details: "
                        f"python -m vlm.data check --config CONFIG)")
    if bad and output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / SKIPPED_FILE, "w", encoding="utf-8") as out:
            for kind, found in sorted(report.problems.items()):
                for record_id, why in found:
                    out.write(json.dumps({"id": record_id, "problem": kind, "detail": why}) + "\n")
    return bad
