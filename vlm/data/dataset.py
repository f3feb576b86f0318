"""The training dataset, its collate function and a length-grouped sampler."""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from vlm.config import DataConfig
from vlm.data.cache import FeatureCache
from vlm.data.formats import DataError, Record, open_record_image
from vlm.data.templates import encode
from vlm.images import ImageError
from vlm.processor import VLMProcessor

FAILURES_FILE = "decode_failures.jsonl"  # samples whose image failed to decode mid-run, one line each time
MAX_FAILED_IN_A_ROW = 64  # more than this many failures one after another is the data, not one bad file


class VLMDataset(Dataset):
    """Records that passed preflight, encoded on the fly; images as pixels or as cached tower features.

    The preflight reads image headers only, so a body can still fail to decode here: that sample is
    replaced by the next one (the batch keeps its size, every rank keeps stepping), counted, and its id
    appended to ``failures_file``, which worker processes share.
    """

    def __init__(self, records: Sequence[Record], processor: VLMProcessor, data: DataConfig, lengths: dict[int, int],
                 skip_ids: Collection[int] = frozenset(), feature_cache: FeatureCache | None = None,
                 image_keys: dict[int, list[str]] | None = None, failures_file: str | Path | None = None) -> None:
        """``lengths``: record index -> tokens, for exactly the records the preflight passed (the report's);
        ``skip_ids``: indices of records not to train (enforce's answer; records sharing an id are told
        apart by index); ``image_keys``: record index -> the cache keys of its images (with a ``feature_cache``)."""
        self.records, self.processor, self.data, self.cache = records, processor, data, feature_cache
        self.indices = [i for i in sorted(lengths) if i not in skip_ids]
        self.lengths = [lengths[i] for i in self.indices]
        self.image_keys = image_keys or {}
        self.failures_file = failures_file
        self.failed: list[dict] = []  # this process's failures (a worker's stay in the worker: see the file)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        for attempt in range(MAX_FAILED_IN_A_ROW):
            index = self.indices[(position + attempt) % len(self.indices)]
            try:
                return self._sample(index)
            except ImageError as error:
                self._failed(index, error)
        raise DataError(f"{MAX_FAILED_IN_A_ROW} samples in a row failed to decode (last: {self.failed[-1]['detail']})")

    def _failed(self, index: int, error: Exception) -> None:
        failure = {"index": index, "id": self.records[index].id, "detail": str(error)}
        self.failed.append(failure)
        warnings.warn(f"sample {failure['id']} skipped: {error}", stacklevel=2)
        if self.failures_file is not None:
            with open(self.failures_file, "a", encoding="utf-8") as out:  # one short append: safe across processes
                out.write(json.dumps(failure) + "\n")

    def _sample(self, index: int) -> dict:
        """Ids, labels and the images; each ``<image>`` gets its own picture's slots (NaFlex: its patch grid)."""
        record = self.records[index]
        sample: dict = {"id": record.id}
        counts: int | list[int] = self.processor.tokens_per_image
        if record.images and self.cache is not None:
            if any(key not in self.cache for key in self.image_keys[index]):
                raise ImageError(f"an image of record {record.id} failed to decode when the feature cache was built")
            features = [self.cache[key] for key in self.image_keys[index]]
            if self.processor.variable_tokens:  # a NaFlex tower's features are as long as the image's slots
                counts = [len(image) for image in features]
            sample["vision_features"] = torch.stack(features) if len({f.shape for f in features}) == 1 else features
        elif record.images:
            pictures = [open_record_image(image, self.data.image_folder) for image in record.images]
            images = self.processor.preprocess(pictures, aspect=self.data.image_aspect)
            counts = self.processor.image_tokens(images.get("spatial_shapes"), len(pictures))
            sample.update(images)
        ids, labels = encode(record.messages, self.processor.tokenizer, self.data.template, self.processor.image_token,
                             counts, self.data.max_length, "truncate" if self.data.on_too_long == "truncate" else "skip")
        sample.update(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
        return sample


def collate(samples: list[dict], pad_token_id: int) -> dict:
    """Right-pad ids (labels with -100) and join the images of every sample, in order.

    ``vision_features`` of different lengths (a NaFlex tower's, from the cache) stay a flat list, one per image.
    """
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = sample["input_ids"], sample["labels"], 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "ids": [s["id"] for s in samples]}
    for key in ("pixel_values", "spatial_shapes"):
        found = [s[key] for s in samples if key in s]
        batch[key] = torch.cat(found) if found else None
    features = [image for s in samples if "vision_features" in s for image in s["vision_features"]]
    same = len({image.shape for image in features}) == 1
    batch["vision_features"] = (torch.stack(features) if same else features) if features else None
    return batch


class LengthGroupedSampler(Sampler[int]):
    """A shuffled order in which each run of ``group_size`` samples has similar lengths (less padding).

    ``group_size`` is the batch of one step across all processes, so that one process with batch B and
    two with B/2 see the same samples in each step. The order depends on (seed, epoch) only.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int = 0, group_by_length: bool = True,
                 groups_per_window: int = 32) -> None:
        self.lengths, self.group_size, self.seed = lengths, group_size, seed
        self.group_by_length, self.window = group_by_length, group_size * groups_per_window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            return iter(order)
        grouped = []
        for start in range(0, len(order), self.window):  # sort within windows: still random across them
            window = sorted(order[start:start + self.window], key=lambda i: -self.lengths[i])
            groups = [window[i:i + self.group_size] for i in range(0, len(window), self.group_size)]
            for g in torch.randperm(len(groups), generator=generator).tolist():
                grouped += groups[g]
        return iter(grouped)
