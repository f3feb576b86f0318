"""Tokenizer + image processor; each ``<image>`` in the text becomes exactly ``tokens_per_image`` slots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature

from vlm.images import load_image, to_square

ImageInput = Image.Image | str | Path


class VLMProcessor:
    """Callable like a transformers processor: ``processor(images=..., text=..., return_tensors="pt")``."""

    def __init__(self, tokenizer, image_processor, tokens_per_image: int, image_token: str = "<image>",
                 image_size: int | None = None, image_aspect: str = "pad") -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens_per_image = tokens_per_image
        self.image_token = image_token
        self.image_aspect = image_aspect
        self.image_size = image_size
        # Generation appends new tokens on the right, so prompts in a batch are padded on the left.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """LLaVA pads with the processor's mean colour, which normalises to zero."""
        return tuple(int(round(255 * m)) for m in self.image_processor.image_mean)

    def _resize_kwargs(self) -> dict:
        if self.image_size is None:
            return {}
        square = {"height": self.image_size, "width": self.image_size}
        if getattr(self.image_processor, "crop_size", None) is not None:  # CLIP: shortest edge, then crop
            return {"size": {"shortest_edge": self.image_size}, "crop_size": square}
        return {"size": square}

    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        pictures = [to_square(load_image(i) if isinstance(i, (str, Path)) else i.convert("RGB"),
                              self.image_aspect, self.pad_fill) for i in images]
        return self.image_processor(pictures, return_tensors="pt", **self._resize_kwargs())["pixel_values"]

    def expand_image_tokens(self, text: str) -> str:
        return text.replace(self.image_token, self.image_token * self.tokens_per_image)

    def __call__(self, images: ImageInput | Sequence | None = None, text: str | Sequence[str] | None = None,
                 return_tensors: str = "pt", padding: bool | str = True, **tokenizer_kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        flat_images = _flatten(images)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat_images):
            raise ValueError(f"the text has {placeholders} {self.image_token} placeholder(s) but "
                             f"{len(flat_images)} image(s) were given")
        encoded = self.tokenizer([self.expand_image_tokens(t) for t in texts], return_tensors=return_tensors,
                                 padding=padding, **tokenizer_kwargs)
        data = dict(encoded)
        if flat_images:
            data["pixel_values"] = self.preprocess_images(flat_images)
        return BatchFeature(data, tensor_type=return_tensors)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, token_ids, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)


def load_tokenizer(name_or_path: str, image_token: str = "<image>", **kwargs):
    """The LLM's tokenizer with the image placeholder added as one special token."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    return tokenizer


def load_image_processor(name_or_path: str, **kwargs):
    # Pin the PIL backend: the default depends on whether torchvision is installed, and the two give
    # slightly different pixels; a model must see the same pixels on every machine.
    return AutoImageProcessor.from_pretrained(name_or_path, backend="pil", **kwargs)


def _flatten(images) -> list:
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, Path)):
        return [images]
    flat = []
    for item in images:
        flat.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return flat
