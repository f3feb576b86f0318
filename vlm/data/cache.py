"""The frozen tower's features, computed once into safetensors shards and read back instead of re-running it.

Features are stored by image content (sha256 of the file's bytes), under a folder named by everything
that shapes them (the tower's config and weights, layer, CLS choice, image size and aspect), so a
changed image or a retrained tower of the same shape never reads stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

SHARD_IMAGES = 256
# Bumped whenever the pixel rules change (vlm.processor), so caches made under older rules are not read.
PIXEL_RULES_VERSION = 2


def content_key(image) -> str:
    """sha256 of an image's bytes: a path's file, raw bytes, or a PIL image's pixels."""
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    elif isinstance(image, bytes):
        data = image
    else:
        data = image.tobytes() + repr((image.mode, image.size)).encode()
    return hashlib.sha256(data).hexdigest()


def record_image_key(image, image_folder: str | Path) -> str:
    """The cache key of a record's image (paths are relative to the image folder)."""
    return content_key(Path(image_folder) / image if isinstance(image, (str, Path)) else image)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names and bytes): ~1 s per GB on this CPU."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model_config, tower: torch.nn.Module, image_processor_config: dict | list[dict],
                aspect: str | None = None) -> str:
    """``image_processor_config``: a list for fused towers, one per tower; ``aspect``: the training pictures'
    (data.image_aspect) where it differs from the model's."""
    shape = {"tower": tower.config.to_dict(), "weights": weights_digest(tower), "pixels": image_processor_config,
             "layer": model_config.vision_feature_layer, "select": model_config.vision_feature_select,
             "size": model_config.image_size, "aspect": aspect or model_config.image_aspect,
             "dtype": model_config.dtype, "pixel_rules": PIXEL_RULES_VERSION}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureCache:
    """``cache[content_key] -> [patches, width]`` tensor (NaFlex: each image's own patches), read lazily from
    memory-mapped shards."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_file = self.folder / "index.json"
        self.index: dict[str, str] = json.loads(index_file.read_text()) if index_file.is_file() else {}
        self._handles: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __getitem__(self, key: str) -> torch.Tensor:
        shard = self.index[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def add(self, features: dict[str, torch.Tensor]) -> None:
        """Write one shard, then the index (atomically), so an interrupted build loses at most a shard."""
        if not features:
            return
        shard = f"shard_{len(set(self.index.values())):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in features.items()}, self.folder / shard)
        self.index.update(dict.fromkeys(features, shard))
        partial = self.folder / "index.json.partial"
        partial.write_text(json.dumps(self.index))
        os.replace(partial, self.folder / "index.json")

    @classmethod
    def folder_for(cls, model, processor, root: str | Path, aspect: str | None = None) -> Path:
        settings = [image_processor.to_dict() for image_processor in processor.image_processors]
        # One tower keeps its bare dict, so caches written before fused towers existed are still found.
        pixels = settings[0] if len(settings) == 1 else settings
        return Path(root) / fingerprint(model.config, model.vision_tower.encoder, pixels, aspect)

    @classmethod
    @torch.no_grad()
    def build(cls, model, processor, images: dict[str, object], image_folder: str | Path, root: str | Path,
              is_main_process: bool = True, batch_size: int = 16, aspect: str | None = None) -> FeatureCache:
        """Compute the features of every image (``key -> record image``) that the cache lacks.

        ``aspect``: data.image_aspect (None: the model's). Only the main process computes and writes; the
        others wait and then open the cache. An image that fails to decode is left out (its sample is
        skipped when asked for), never fatal: the preflight only read its header.
        """
        from vlm.data.formats import open_record_image
        from vlm.images import ImageError

        cache = cls(cls.folder_for(model, processor, root, aspect))
        missing = [key for key in images if key not in cache]
        if missing and is_main_process:
            cache.folder.mkdir(parents=True, exist_ok=True)
            pending: dict[str, torch.Tensor] = {}
            for start in tqdm(range(0, len(missing), batch_size), desc="feature cache", unit="batch"):
                keys, pictures = [], []
                for key in missing[start:start + batch_size]:
                    try:
                        pictures.append(open_record_image(images[key], image_folder))
                        keys.append(key)
                    except ImageError:  # left out of the cache: training skips its sample and says so
                        continue
                if not keys:
                    continue
                inputs = {k: v.to(model.device) for k, v in processor.preprocess(pictures, aspect=aspect).items()}
                features = model.vision_tower(inputs["pixel_values"], inputs.get("spatial_shapes"))
                # A NaFlex tower gives each image its own length: each is stored as it is.
                pending.update((key, image.cpu()) for key, image in zip(keys, features, strict=True))
                if len(pending) >= SHARD_IMAGES:
                    cache.add(pending)
                    pending = {}
            cache.add(pending)
        return cache
