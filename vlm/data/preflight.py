"""Check every record before training: images open, ``<image>`` count matches, roles alternate, it fits.

``python -m vlm.data check --config CONFIG`` prints the report; training runs the same check, refuses to
start above ``data.max_bad_fraction`` and writes the records it skips to ``skipped_records.jsonl``.
Every record read is counted once, as good or as bad (its first problem), so the counts add up; of
records sharing an id, the first is checked and trained and every later one is reported ``duplicate_id``.

At LLaVA's scale (665K records) the check runs in worker processes and reads only each image's header
(missing, empty, non-image, bomb); a body that fails to decode later is skipped in training. Its report is
cached under a key of the data file's sha256 and every setting that changes lengths, so every rank,
every resume and the next run on the same data read it instead of checking again.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vlm.config import DataConfig
from vlm.data.formats import DataError, Record, open_record_image, probe_record_image
from vlm.data.templates import SampleError, fit, tokenize
from vlm.images import ImageError
from vlm.processor import VLMProcessor

SHOWN_IDS = 5
SKIPPED_FILE = "skipped_records.jsonl"
CHUNK = 256  # records per task handed to a worker process
PARALLEL_FROM = 2048  # fewer records are checked in this process: starting workers would cost more
# Bumped whenever a check changes, so reports cached by an older version are not read.
PREFLIGHT_VERSION = 1
EXIF_ORIENTATION = 0x0112


@dataclass
class PreflightReport:
    total: int
    lengths: dict[int, int] = field(default_factory=dict)  # record index -> tokens (visual included), good ones
    # kind -> (record index, id, why); each record has at most one problem
    problems: dict[str, list[tuple[int, str, str]]] = field(default_factory=lambda: defaultdict(list))
    truncated: list[tuple[int, str]] = field(default_factory=list)  # good records cut to data.max_length: (index, id)

    @property
    def bad(self) -> set[int]:
        """Indices of the records that fail (each has exactly one problem)."""
        return {index for found in self.problems.values() for index, _, _ in found}

    def format(self) -> str:
        bad = len(self.bad)
        cut = f" ({len(self.truncated)} truncated to data.max_length)" if self.truncated else ""
        lines = [f"preflight: {self.total} records, {len(self.lengths)} good{cut}, {bad} bad"]
        for kind, found in sorted(self.problems.items()):
            lines.append(f"  {kind}: {len(found)} ({_shown([record_id for _, record_id, _ in found])}); "
                         f"first: {found[0][2]}")
        if self.truncated:
            shown = _shown([record_id for _, record_id in self.truncated])
            lines.append(f"  truncated: {len(self.truncated)} ({shown})")
        return "\n".join(lines)


def _shown(ids: list[str]) -> str:
    more = f", ... {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
    return f"ids: {', '.join(ids[:SHOWN_IDS])}{more}"


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
        if not message["content"].strip():
            raise SampleError("empty_turn", f"turn {index} ({'human' if expected == 'user' else 'gpt'}) is empty")
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


def check_paths(record: Record, data: DataConfig) -> None:
    """Image paths stay inside data.image_folder (no absolute path, no ``..`` out of it) unless allowed."""
    if data.allow_outside_paths:
        return
    for image in record.images:
        if isinstance(image, (str, PurePath)):
            path = PurePath(image)
            if path.is_absolute() or os.path.normpath(path).split(os.sep)[0] == "..":
                raise SampleError("image_outside_folder", f"image path {str(image)!r} leaves data.image_folder "
                                                          "(set data.allow_outside_paths=true to allow it)")


def check_images(record: Record, image_folder: str, decode: bool = False,
                 sizes: bool = False) -> list[tuple[int, int]]:
    """Each image's header (``decode``: its whole body too, ~100x slower); ``sizes``: returns each picture's
    (width, height) as training will see it (a NaFlex tower's slots follow it)."""
    found = []
    for image in record.images:
        try:
            if decode:
                found.append(open_record_image(image, image_folder).size)
            else:
                probe_record_image(image, image_folder)
                if sizes:
                    found.append(_header_size(image, image_folder))
        except ImageError as error:
            kind = "missing_image" if "does not exist" in str(error) else "corrupt_image"
            raise SampleError(kind, str(error)) from None
    return found


def _header_size(image, image_folder: str) -> tuple[int, int]:
    """(width, height) from the header (of an image the probe passed), turned as ``open_record_image`` turns it:
    a file's EXIF orientation 5-8 swaps the sides."""
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else Path(image_folder) / image) as opened:
        width, height = opened.size
        turned = not isinstance(image, bytes) and opened.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def check_record(record: Record, processor: VLMProcessor, data: DataConfig, decode: bool = False) -> tuple[int, bool]:
    """Raise :class:`SampleError` naming the first problem of a record; return its length in tokens (after
    truncation) and whether it was truncated."""
    check_roles(record)
    check_placeholders(record, processor.image_token)
    check_paths(record, data)
    sizes = check_images(record, data.image_folder, decode, sizes=processor.variable_tokens)
    counts = [processor.image_tokens_for(*size) for size in sizes] if processor.variable_tokens \
        else processor.tokens_per_image
    ids, labels = tokenize(record.messages, processor.tokenizer, data.template, processor.image_token, counts)
    fitted, _ = fit(ids, labels, processor.image_token_id, data.max_length,
                    "truncate" if data.on_too_long == "truncate" else "skip")
    return len(fitted), len(fitted) < len(ids)


_WORK: tuple | None = None  # (records, processor, data, decode) of the check running in this process


def _set_work(*work) -> None:
    global _WORK
    _WORK = work


def _check_chunk(bounds: tuple[int, int]) -> list[tuple[str, tuple]]:
    """(id, (length, truncated) | (problem, why)) of each record in [start, stop)."""
    records, processor, data, decode = _WORK
    out = []
    for index in range(*bounds):
        try:
            record = records[index]
        except DataError as error:  # a JSONL line that is not JSON: that record is bad, not the file
            out.append((f"#{index}", ("bad_json", str(error))))
            continue
        try:
            out.append((record.id, check_record(record, processor, data, decode)))
        except SampleError as error:
            out.append((record.id, (error.problem, str(error))))
    return out


def cpu_count() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_records(records: Sequence[Record], processor: VLMProcessor, data: DataConfig, workers: int | None = None,
                  decode: bool = False) -> PreflightReport:
    """``workers``: processes (None: every core, for large data sets); ``decode``: decode every image fully."""
    total = len(records)
    workers = workers or (cpu_count() if total >= PARALLEL_FROM else 1)
    chunks = [(start, min(start + CHUNK, total)) for start in range(0, total, CHUNK)]
    work = (records, processor, data, decode)
    pool = None
    if workers > 1:
        # fork: workers inherit the tokenizer and the memory-mapped records instead of unpickling them.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_set_work, initargs=work)
        results = pool.map(_check_chunk, chunks)
    else:
        _set_work(*work)
        results = map(_check_chunk, chunks)
    report = PreflightReport(total=total)
    first_of: dict[str, int] = {}
    try:
        with tqdm(total=total, desc="preflight", unit="record", leave=False) as progress:
            for (start, _), outcomes in zip(chunks, results, strict=True):
                for index, (record_id, outcome) in enumerate(outcomes, start):
                    if record_id in first_of:  # duplicates are judged in file order, whoever checked them
                        report.problems["duplicate_id"].append(
                            (index, record_id, f"record {index} repeats the id of record {first_of[record_id]}, "
                                               f"which is kept"))
                        continue
                    first_of[record_id] = index
                    if isinstance(outcome[0], str):
                        report.problems[outcome[0]].append((index, record_id, outcome[1]))
                    else:
                        report.lengths[index], truncated = outcome
                        if truncated:
                            report.truncated.append((index, record_id))
                progress.update(len(outcomes))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _set_work(None, None, None, None)
    return report


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its full definition (vocab, merges, normalizer, added
    tokens) where it has one, else its sentencepiece model or vocab; and its chat template."""
    digest = hashlib.sha256(f"{type(tokenizer).__name__}\0{tokenizer.chat_template}\0"
                            f"{sorted(tokenizer.special_tokens_map.items())}".encode())
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    elif getattr(tokenizer, "sp_model", None) is not None:
        digest.update(tokenizer.sp_model.serialized_model_proto())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()


def preflight_key(processor: VLMProcessor, data: DataConfig, data_digest: str) -> str:
    """Names a report by the data file's content and every setting that changes what the check finds."""
    shape = {"version": PREFLIGHT_VERSION, "data": data_digest, "image_folder": str(Path(data.image_folder).resolve()),
             "image_column": data.image_column, "allow_outside_paths": data.allow_outside_paths,
             "template": data.template, "max_length": data.max_length, "on_too_long": data.on_too_long,
             "image_token": processor.image_token, "tokens_per_image": processor.tokens_per_image,
             "tokenizer": tokenizer_digest(processor.tokenizer)}
    if processor.variable_tokens:  # a NaFlex tower's slots per image follow its patch size and budget
        shape["pixels"] = processor.image_processor.to_dict()
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_report(report: PreflightReport, folder: Path, key: str) -> None:
    """``<key>.npz`` (good records' indices and lengths), then ``<key>.json``, whose presence marks it whole."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = f".partial_{os.getpid()}"
    indices = np.fromiter(report.lengths, dtype=np.int64, count=len(report.lengths))
    lengths = np.fromiter(report.lengths.values(), dtype=np.int64, count=len(report.lengths))
    with open(folder / f"{key}.npz{partial}", "wb") as stream:
        np.savez(stream, indices=indices, lengths=lengths)
    os.replace(folder / f"{key}.npz{partial}", folder / f"{key}.npz")
    (folder / f"{key}.json{partial}").write_text(json.dumps(
        {"total": report.total, "problems": report.problems, "truncated": report.truncated}))
    os.replace(folder / f"{key}.json{partial}", folder / f"{key}.json")


def load_report(folder: Path, key: str) -> PreflightReport | None:
    """The cached report, or None where there is none (or an unreadable one: it is checked again)."""
    try:
        text = json.loads((folder / f"{key}.json").read_text())
        with np.load(folder / f"{key}.npz", allow_pickle=False) as arrays:
            lengths = dict(zip(arrays["indices"].tolist(), arrays["lengths"].tolist(), strict=True))
        problems = defaultdict(list, {kind: [tuple(p) for p in found] for kind, found in text["problems"].items()})
        return PreflightReport(total=text["total"], lengths=lengths, problems=problems,
                               truncated=[tuple(t) for t in text["truncated"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_check(records: Sequence[Record], processor: VLMProcessor, data: DataConfig, folder: str | Path,
                 data_digest: str, computes: bool = True, poll_s: float = 0.5) -> tuple[PreflightReport, bool]:
    """The report from ``folder`` if there, else checked and written there. A process with ``computes``
    False (a rank that is not its node's first) waits for the file instead: no collective call waits
    through a long check, so no process-group timeout can cut it. Returns (report, whether checked here)."""
    folder, key = Path(folder), preflight_key(processor, data, data_digest)
    report = load_report(folder, key)
    while report is None and not computes:
        time.sleep(poll_s)
        report = load_report(folder, key)
    if report is not None:
        return report, False
    report = check_records(records, processor, data)
    save_report(report, folder, key)
    return report, True


def enforce(report: PreflightReport, max_bad_fraction: float, output_dir: str | Path | None,
            on_too_long: str = "skip") -> set[int]:
    """Refuse to train over too many bad records (or none good); otherwise write the skipped records and
    return their indices. Training uses exactly the records in ``report.lengths``."""
    if on_too_long == "error" and report.problems.get("too_long"):
        raise DataError(f"{len(report.problems['too_long'])} record(s) exceed data.max_length and "
                        f"data.on_too_long=error (first: {report.problems['too_long'][0][1]})")
    bad = report.bad
    if not report.lengths:
        raise DataError(f"none of the {report.total} records passed the preflight (details: python -m vlm.data "
                        f"check --config CONFIG)")
    if len(bad) / report.total > max_bad_fraction:
        raise DataError(f"{len(bad)} of {report.total} records are bad ({100 * len(bad) / report.total:.1f}%), above "
                        f"data.max_bad_fraction={max_bad_fraction}: fix them or raise the limit (details: "
                        f"python -m vlm.data check --config CONFIG)")
    if bad and output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / SKIPPED_FILE, "w", encoding="utf-8") as out:
            for kind, found in sorted(report.problems.items()):
                for index, record_id, why in found:
                    out.write(json.dumps({"index": index, "id": record_id, "problem": kind, "detail": why}) + "\n")
    return bad
