"""Training records from the files users bring: LLaVA conversation JSON / JSONL, or Hugging Face datasets.

Every source becomes a sequence of :class:`Record`: an id, its images (a path relative to the image folder,
raw bytes, or a PIL image) and the conversation as ``{"role": system|user|assistant, "content"}`` turns.
Records are decoded when asked for: a JSON or JSONL file is memory-mapped and indexed by the byte span of
each record, a datasets table stays memory-mapped Arrow, so a million records hold a few MB of index.
"""

from __future__ import annotations

import io
import json
import mmap
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DATASET_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
CHUNK = 16 << 20  # bytes scanned at a time when indexing a file: memory stays flat with its size
_SPACE = re.compile(r"[ \t\n\r]*")


class DataError(ValueError):
    """A data file that cannot be read, with a message fit for one line."""


@dataclass
class Record:
    id: str
    images: list[Any] = field(default_factory=list)  # str path | bytes | PIL.Image
    messages: list[dict] = field(default_factory=list)  # {"role", "content"}; unknown roles kept for preflight


def load_records(path: str | Path, image_column: str = "image") -> Sequence[Record]:
    """Read LLaVA JSON (a list) or JSONL, or a local datasets folder / json / parquet / arrow file, lazily."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        records = DatasetRecords(_load_dataset_folder(path), image_column, path)
    elif path.suffix in DATASET_SUFFIXES:
        from datasets import load_dataset

        records = DatasetRecords(load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train"),
                                 image_column, path)
    else:
        records = JsonRecords(path)
    if not len(records):  # training would otherwise start on nothing and divide by zero
        raise DataError(f"{path}: no records (the data set is empty)")
    return records


class JsonRecords(Sequence):
    """Records of a JSON list or JSONL file: the file memory-mapped, each record's byte span in two arrays."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        data = self._bytes()
        start = 3 if data[:3] == b"\xef\xbb\xbf" else 0  # a byte-order mark, as some Windows editors write
        first = data[start:start + 4096].lstrip()[:1]
        if path.suffix != ".jsonl" and first == b"[":
            self.lines = False
            self.starts, self.ends = _index_list(path, data, start)
        else:
            self.lines = True  # errors in a line are the preflight's to report (bad_json), not the whole file's
            self.starts, self.ends, self.line_numbers = _index_lines(path, data, start)

    def _bytes(self):
        if self._map is None:
            with open(self.path, "rb") as stream:
                size = stream.seek(0, 2)
                self._map = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return self._map

    def __getstate__(self) -> dict:  # a worker process maps the file itself
        return {**self.__dict__, "_map": None}

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Record:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        text = self._bytes()[int(self.starts[index]):int(self.ends[index])]
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            line = int(self.line_numbers[index]) if self.lines else index + 1
            where = f"column {error.colno}: {error.msg}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
            raise DataError(f"{self.path}: line {line}, {where}") from None
        return _record(raw, index)


def _utf8_error(path: Path, data, position: int) -> DataError:
    line = data[:position].count(b"\n") + 1
    column = position - (data.rfind(b"\n", 0, position) + 1) + 1
    return DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[position]:02x} at byte {column} of "
                     f"the line); save the file as UTF-8")


def _index_lines(path: Path, data, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte spans and line numbers of the non-blank lines, found chunk by chunk (checked to be UTF-8 on the way).
    The file is read, not touched through the mapping, so indexing leaves none of it resident."""
    starts, ends, numbers, lines_before = [], [], [], 0
    with open(path, "rb") as stream:
        stream.seek(start)
        pending = b""
        while True:
            block = stream.read(CHUNK)
            if block and b"\n" not in block:  # a line longer than a chunk: read on
                pending += block
                continue
            cut = len(pending) + block.rfind(b"\n") + 1 if block else len(pending)
            chunk, pending = (pending + block)[:cut], (pending + block)[cut:]
            if not chunk:
                break
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _utf8_error(path, data, start + error.start) from None
            array = np.frombuffer(chunk, dtype=np.uint8)
            breaks = np.flatnonzero(array == 10)
            line_starts = np.concatenate([[0], breaks + 1])
            line_ends = np.concatenate([breaks, [len(chunk)]])
            keep = line_ends > line_starts
            for i in np.flatnonzero(keep)[np.isin(array[line_starts[keep]], (9, 13, 32))]:
                keep[i] = bool(chunk[line_starts[i]:line_ends[i]].strip())  # rare: a line that starts with a blank
            starts.append(line_starts[keep] + start)
            ends.append(line_ends[keep] + start)
            numbers.append((np.flatnonzero(keep) + lines_before + 1).astype(np.int32))
            lines_before += len(breaks)
            start += len(chunk)
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(numbers)


def _index_list(path: Path, data, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans of the elements of a JSON list; each is parsed once here, so a syntax error names its line."""
    try:
        text = str(data[start:], "utf-8")
    except UnicodeDecodeError as error:
        raise _utf8_error(path, data, start + error.start) from None
    ascii_only = text.isascii()  # then character positions are byte positions
    decoder = json.JSONDecoder()
    starts, ends = [], []
    position = _SPACE.match(text, text.index("[") + 1).end()
    byte, char = start, 0  # a character position and its byte position, advanced together
    try:
        while text[position:position + 1] != "]" or starts:  # one element and what follows it per turn
            _, end = decoder.raw_decode(text, position)  # after a comma, "]" is no element: the error names it
            if ascii_only:
                starts.append(start + position)
                ends.append(start + end)
            else:
                byte += len(text[char:position].encode())
                starts.append(byte)
                byte += len(text[position:end].encode())
                ends.append(byte)
                char = end
            position = _SPACE.match(text, end).end()
            if text[position:position + 1] == "]":
                break
            if text[position:position + 1] != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
            position = _SPACE.match(text, position + 1).end()
        rest = _SPACE.match(text, position + 1).end()
        if rest < len(text):
            raise json.JSONDecodeError("Extra data", text, rest)
    except json.JSONDecodeError as error:  # e.g. the trailing comma of a widely copied example
        raise DataError(f"{path}: line {error.lineno}, column {error.colno}: {error.msg}") from None
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)


class DatasetRecords(Sequence):
    """Rows of a (memory-mapped) datasets table with LLaVA columns, made into records when asked for."""

    def __init__(self, dataset, image_column: str, path: Path) -> None:
        from datasets import Image as ImageFeature

        if len(dataset) and image_column not in dataset.column_names:
            raise DataError(f"{path}: no image column {image_column!r} (columns: {', '.join(dataset.column_names)});"
                            f" set data.image_column")
        if image_column in dataset.column_names and isinstance(dataset.features[image_column], ImageFeature):
            # Keep the encoded bytes: decoding every image up front would hold the whole set in memory.
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.dataset, self.image_column = dataset, image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Record:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        raw = dict(self.dataset[int(index) % len(self)])
        raw["image"] = _image_value(raw.pop(self.image_column, None))
        return _record(raw, index % len(self))


def _record(raw: Any, index: int) -> Record:
    """One LLaVA record; malformed turns are kept as they are so that preflight can name them."""
    if not isinstance(raw, dict):
        return Record(id=f"#{index}", messages=[{"role": "?", "content": raw}])
    image = raw.get("image")
    images = [] if image is None else list(image) if isinstance(image, list) else [image]
    messages = []
    for turn in raw.get("conversations") or []:
        if isinstance(turn, dict):
            role = turn.get("from", turn.get("role"))
            messages.append({"role": ROLES.get(role, role), "content": turn.get("value", turn.get("content"))})
        else:
            messages.append({"role": None, "content": turn})
    return Record(id=str(raw.get("id", f"#{index}")), images=images, messages=messages)


def _load_dataset_folder(path: Path):
    from datasets import load_dataset, load_from_disk

    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        dataset = load_from_disk(str(path))
        return dataset["train"] if hasattr(dataset, "keys") else dataset
    return load_dataset(str(path), split="train")


def _image_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_image_value(v) for v in value]
    if isinstance(value, dict):  # datasets' undecoded Image: {"bytes", "path"}
        return value.get("bytes") or value.get("path")
    return value


def probe_record_image(image: Any, image_folder: str | Path) -> None:
    """What a header shows, in ~0.03 ms instead of a 3 ms decode: the file is there, is an image, has pixels
    and is no decompression bomb. A body that fails to decode later is skipped in training, not fatal."""
    from vlm.images import MAX_PIXELS, ImageError

    if isinstance(image, Image.Image):
        return
    if isinstance(image, (str, Path)):
        path = Path(image_folder) / image
        if path.is_dir():
            raise ImageError(f"image {path} is a folder, not an image file")
        if not path.is_file():
            raise ImageError(f"image {path} does not exist")
        source, name = path, f"image {path}"
    elif isinstance(image, bytes):
        source, name = io.BytesIO(image), "embedded image"
    else:
        raise ImageError(f"image entry of type {type(image).__name__} is neither a path, bytes nor an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                width, height = opened.size
                mode = opened.mode
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{name} cannot be read: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:  # a header cut short
        raise ImageError(f"{name} cannot be read (truncated or corrupt): {error}") from None
    if width * height == 0:
        raise ImageError(f"{name} is {width}x{height}: it has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name} is {width}x{height}: over the {MAX_PIXELS:,}-pixel limit (possible "
                         f"decompression bomb)")
    if mode not in Image.MODES:
        raise ImageError(f"{name} has pixel mode {mode!r}, which cannot be made RGB")


def open_record_image(image: Any, image_folder: str | Path) -> Image.Image:
    """A record's image as RGB, whatever form it came in (path, bytes or PIL)."""
    from vlm.images import ImageError, load_image, to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, bytes):
        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                return to_rgb(opened)
        except OSError as error:
            raise ImageError(f"embedded image cannot be read: {error}") from None
    if isinstance(image, (str, Path)):
        return load_image(Path(image_folder) / image)
    raise ImageError(f"image entry of type {type(image).__name__} is neither a path, bytes nor an image")
