"""Training records from the files users bring: LLaVA conversation JSON / JSONL, or Hugging Face datasets.

Every source becomes a list of :class:`Record`: an id, its images (a path relative to the image folder,
raw bytes, or a PIL image) and the conversation as ``{"role": system|user|assistant, "content"}`` turns.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DATASET_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


class DataError(ValueError):
    """A data file that cannot be read, with a message fit for one line."""


@dataclass
class Record:
    id: str
    images: list[Any] = field(default_factory=list)  # str path | bytes | PIL.Image
    messages: list[dict] = field(default_factory=list)  # {"role", "content"}; unknown roles kept for preflight


def load_records(path: str | Path, image_column: str = "image") -> list[Record]:
    """Read LLaVA JSON (a list) or JSONL, or a local datasets folder / json / parquet / arrow file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        return _from_dataset(_load_dataset_folder(path), image_column)
    if path.suffix in DATASET_SUFFIXES:
        from datasets import load_dataset

        return _from_dataset(load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train"),
                             image_column)
    return [_record(raw, index) for index, raw in enumerate(_read_json(path))]


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: line {number}, column {error.colno}: {error.msg}") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:  # e.g. the trailing comma of a widely copied example
        raise DataError(f"{path}: line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(rows).__name__}")
    return rows


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


def _from_dataset(dataset, image_column: str) -> list[Record]:
    """Rows of a datasets table with LLaVA columns; the image column holds paths, bytes or PIL images."""
    from datasets import Image as ImageFeature

    if image_column in dataset.column_names and isinstance(dataset.features[image_column], ImageFeature):
        # Keep the encoded bytes: decoding every image up front would hold the whole set in memory.
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    records = []
    for index, row in enumerate(dataset):
        raw = dict(row)
        raw["image"] = _image_value(raw.pop(image_column, None))
        records.append(_record(raw, index))
    return records


def _image_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_image_value(v) for v in value]
    if isinstance(value, dict):  # datasets' undecoded Image: {"bytes", "path"}
        return value.get("bytes") or value.get("path")
    return value


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
