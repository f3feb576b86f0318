"""Tokenizer + image processor; each ``<image>`` in the text becomes exactly ``tokens_per_image`` slots.

Text is tokenized as LLaVA's ``tokenizer_image_token`` does (:func:`tokenize_with_images`), by training, this
processor and the chat session alike.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature

from vlm.config import IMAGE_ASPECTS
from vlm.images import expand_to_square, load_image

ImageInput = Image.Image | str | Path


class VLMProcessor:
    """Callable like a transformers processor: ``processor(images=..., text=..., return_tensors="pt")``."""

    def __init__(self, tokenizer, image_processor, tokens_per_image: int, image_token: str = "<image>",
                 image_size: int | None = None, image_aspect: str = "pad", split_at_images: bool = True,
                 variable_tokens: bool = False) -> None:
        """``split_at_images=False`` tokenizes the whole expanded string, as Hugging Face's LlavaProcessor does.

        ``image_processor``: a list for fused towers (one preprocessing each). ``variable_tokens``: a NaFlex
        tower, each image's ``<image>`` becomes as many slots as its own patches (``tokens_per_image`` at most).
        """
        self.tokenizer = tokenizer
        self.split_at_images = split_at_images
        self.image_processors = list(image_processor) if isinstance(image_processor, (list, tuple)) else [image_processor]
        self.image_processor = self.image_processors[0]
        self.tokens_per_image = tokens_per_image
        self.variable_tokens = variable_tokens
        self.naflex = "spatial_shapes" in getattr(self.image_processor, "model_input_names", ())
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
        """LLaVA's padding colour, ``int(mean * 255)`` (truncated, as LLaVA and HF Llava compute it)."""
        return _pad_fill(self.image_processor)

    def pixel_rule(self, aspect: str | None = None, image_processor=None) -> dict:
        """The image processor settings (size, centre crop) that give ``aspect``; export writes these for Llava.

        ``crop``: resize the short side, then centre-crop (CLIP's and LLaVA's own rule; a processor that resizes
        straight to a square, as SigLIP's does, gets this rule too, so crop never stretches). ``resize``: straight
        to a square (stretches). ``pad``: LLaVA's expand2square first, then the processor's own rule.
        """
        aspect = aspect or self.image_aspect
        if aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect={aspect!r} is not one of {', '.join(IMAGE_ASPECTS)}")
        processor = image_processor or self.image_processor
        crop_size = _size_dict(getattr(processor, "crop_size", None))
        crops = bool(getattr(processor, "do_center_crop", False)) and bool(crop_size)
        size = _size_dict(processor.size)
        own = {"size": size, "do_center_crop": crops, **({"crop_size": crop_size} if crops else {})}
        side = self.image_size or (crop_size if crops else size).get("height") or size["shortest_edge"]
        square = {"height": side, "width": side}
        to_crop = {"size": {"shortest_edge": side}, "crop_size": square, "do_center_crop": True}
        to_square = {"size": square, "do_center_crop": False}
        if aspect == "crop":
            return own if crops and not self.image_size else to_crop
        if aspect == "resize":
            return own if not crops and "height" in size and not self.image_size else to_square
        return own if not self.image_size else (to_crop if crops else to_square)

    def preprocess_images(self, images: Sequence[ImageInput], aspect: str | None = None) -> torch.Tensor:
        """Pixel values ``[images, 3, side, side]``; ``aspect`` overrides ``image_aspect`` for this call.

        Fused towers: ``[images, 3 * towers, side, side]``, each tower's pixels at its own side, top-left.
        NaFlex: ``[images, patches, 3 * patch * patch]``; its shapes come from :meth:`preprocess` only.
        """
        return self.preprocess(images, aspect)["pixel_values"]

    def preprocess(self, images: Sequence[ImageInput], aspect: str | None = None) -> dict[str, torch.Tensor]:
        """``pixel_values``, and for a NaFlex tower ``spatial_shapes`` ``[images, 2]`` (patch rows, columns)."""
        pictures = [load_image(i) if isinstance(i, (str, Path)) else i.convert("RGB") for i in images]
        if self.naflex:  # NaFlex keeps each picture's aspect ratio within its patch budget: no pad, crop or resize
            out = self.image_processor(pictures, return_tensors="pt")
            return {"pixel_values": out["pixel_values"], "spatial_shapes": out["spatial_shapes"]}
        per_tower = [self._pixels(pictures, aspect, processor) for processor in self.image_processors]
        if len(per_tower) == 1:
            return {"pixel_values": per_tower[0]}
        side = max(pixels.shape[-1] for pixels in per_tower)
        canvas = torch.zeros(len(pictures), 3 * len(per_tower), side, side, dtype=per_tower[0].dtype)
        for k, pixels in enumerate(per_tower):
            canvas[:, 3 * k:3 * k + 3, :pixels.shape[-2], :pixels.shape[-1]] = pixels
        return {"pixel_values": canvas}

    def _pixels(self, pictures: list[Image.Image], aspect: str | None, image_processor) -> torch.Tensor:
        aspect = aspect or self.image_aspect
        settings = self.pixel_rule(aspect, image_processor)
        if aspect == "pad":
            pictures = [expand_to_square(picture, _pad_fill(image_processor)) for picture in pictures]
        if getattr(image_processor, "do_pad", False):  # Llava's processor pads itself: padding is ours to decide
            settings["do_pad"] = False
        return image_processor(pictures, return_tensors="pt", **settings)["pixel_values"]

    def image_tokens(self, spatial_shapes: torch.Tensor | None, images: int) -> list[int]:
        """Slots per image, in order: its own patches for a NaFlex tower, else ``tokens_per_image`` each."""
        if self.variable_tokens and spatial_shapes is not None:
            return spatial_shapes.prod(-1).tolist()
        return [self.tokens_per_image] * images

    def image_tokens_for(self, width: int, height: int) -> int:
        """Slots of one picture of this size, from its header alone (a preflight's length count)."""
        if not self.variable_tokens:
            return self.tokens_per_image
        from transformers.models.siglip2.image_processing_pil_siglip2 import (
            get_image_size_for_max_num_patches,
        )

        patch = self.image_processor.patch_size
        rows, columns = get_image_size_for_max_num_patches(height, width, patch, self.image_processor.max_num_patches)
        return (rows // patch) * (columns // patch)

    def expand_image_tokens(self, text: str, image_tokens: Sequence[int] | None = None) -> str:
        counts = iter(image_tokens or [])
        chunks = text.split(self.image_token)
        return chunks[0] + "".join(self.image_token * next(counts, self.tokens_per_image) + chunk
                                   for chunk in chunks[1:])

    def __call__(self, images: ImageInput | Sequence | None = None, text: str | Sequence[str] | None = None,
                 return_tensors: str = "pt", padding: bool | str = True, **tokenizer_kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        flat_images = _flatten(images)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat_images):
            raise ValueError(f"the text has {placeholders} {self.image_token} placeholder(s) but "
                             f"{len(flat_images)} image(s) were given")
        data = self.preprocess(flat_images) if flat_images else {}
        counts = iter(self.image_tokens(data.get("spatial_shapes"), len(flat_images)))
        per_text = [[next(counts) for _ in range(t.count(self.image_token))] for t in texts]
        data.update(self._tokenize(texts, return_tensors, padding, per_text, **tokenizer_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    def encode(self, text: str, add_special_tokens: bool | None = None,
               image_tokens: Sequence[int] | None = None) -> list[int]:
        """The token ids of one text, each ``<image>`` as ``tokens_per_image`` slots (:func:`tokenize_with_images`).

        ``image_tokens``: slots for each ``<image>`` in order (NaFlex: :meth:`image_tokens` of its pixels).
        """
        return self.encode_with_offsets(text, add_special_tokens, offsets=False, image_tokens=image_tokens)[0]

    def encode_with_offsets(self, text: str, add_special_tokens: bool | None = None, offsets: bool = True,
                            image_tokens: Sequence[int] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's character span in ``text`` (an image's slots all span its placeholder)."""
        tokenize = tokenize_with_images if self.split_at_images else _tokenize_whole
        ids, spans = tokenize(self.tokenizer, text, self.image_token, add_special_tokens, offsets)
        image_id, slotted_ids, slotted_spans = self.image_token_id, [], []
        counts = iter(image_tokens or [])
        for k, token in enumerate(ids):
            count = next(counts, self.tokens_per_image) if token == image_id else 1
            slotted_ids += [token] * count
            slotted_spans += [spans[k]] * count if offsets else []
        return slotted_ids, slotted_spans

    def _tokenize(self, texts: list[str], return_tensors: str, padding: bool | str,
                  image_tokens: list[list[int]] | None = None, **kwargs):
        """One row per text, padded; ``add_special_tokens`` as the tokenizer takes it, the rest goes to ``pad``."""
        special = kwargs.pop("add_special_tokens", None)
        rows = [{"input_ids": self.encode(text, special, counts)}
                for text, counts in zip(texts, image_tokens or [None] * len(texts), strict=True)]
        return self.tokenizer.pad(rows, padding=padding, return_tensors=return_tensors, **kwargs)

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
    if hasattr(tokenizer, "legacy"):  # transformers 5 saves a Llama tokenizer without it; a reload would change ids
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    return tokenizer


def tokenize_with_images(tokenizer, text: str, image_token: str = "<image>", add_special_tokens: bool | None = None,
                         offsets: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """``text`` tokenized as LLaVA's ``tokenizer_image_token``: split at ``image_token`` only, each chunk in one
    tokenizer call, the placeholder's id between chunks; returns ids and, with ``offsets``, character spans.

    The first chunk gets the tokenizer's special tokens (``add_special_tokens=None``: unless the text starts
    with BOS, which then is the one BOS, as the template wrote it), later chunks none. A sentencepiece Llama
    starts each call with "▁" (legacy or not), so for it this differs from tokenizing the whole string; for
    byte-level BPE tokenizers it is the same.
    """
    bos, ids, spans, start = tokenizer.bos_token, [], [], 0
    if add_special_tokens is None:
        add_special_tokens = not (bos and text.startswith(bos))
        if not add_special_tokens:  # the template's BOS is the one BOS; LLaVA's prompt has none, its tokenizer adds it
            ids, spans, start = [tokenizer.bos_token_id], [(0, len(bos))], len(bos)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    for number, chunk in enumerate(text[start:].split(image_token)):
        if number:
            ids.append(image_id)
            spans.append((start, start + len(image_token)))
            start += len(image_token)
        # LLaVA's slow Llama tokenizer writes "▁▁" for a call starting with a space; transformers 5's drops one.
        shift = int(chunk.startswith(" ") and _drops_leading_space(tokenizer))
        encoded = tokenizer(" " * shift + chunk, add_special_tokens=add_special_tokens and not number,
                            return_offsets_mapping=offsets)
        ids += encoded["input_ids"]
        if offsets and shift:  # the added space's own "▁" keeps one character, as a dummy prefix does; a BOS none
            spans += [(start + max(a - 1, 0), start + max(b - 1, min(b, 1))) for a, b in encoded["offset_mapping"]]
        elif offsets:
            spans += [(start + a, start + b) for a, b in encoded["offset_mapping"]]
        start += len(chunk)
    return ids, spans


_DROPS_LEADING_SPACE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> the answer below


def _drops_leading_space(tokenizer) -> bool:
    """Whether a leading space vanishes into the dummy prefix (a sentencepiece Llama in transformers 5); asked
    once per tokenizer (two tokenizer calls, on the preflight's every record otherwise)."""
    if tokenizer not in _DROPS_LEADING_SPACE:
        _DROPS_LEADING_SPACE[tokenizer] = tokenizer.tokenize(" a") == tokenizer.tokenize("a")
    return _DROPS_LEADING_SPACE[tokenizer]


def _tokenize_whole(tokenizer, text: str, _image_token: str, add_special_tokens: bool | None,
                    offsets: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """The whole string in one call (Hugging Face's LlavaProcessor); a text starting with BOS keeps just that one."""
    if add_special_tokens is None:
        add_special_tokens = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets)
    return encoded["input_ids"], [tuple(span) for span in encoded["offset_mapping"]] if offsets else []


def pixel_side(image_processor) -> int | None:
    """The side of the square an image processor's own rule produces (its crop, else its size); None for NaFlex."""
    crop = _size_dict(getattr(image_processor, "crop_size", None))
    size = _size_dict(getattr(image_processor, "size", None))
    if getattr(image_processor, "do_center_crop", False) and crop:
        return crop["height"]
    return size.get("height") or size.get("shortest_edge")


def _pad_fill(image_processor) -> tuple[int, int, int]:
    mean = image_processor.image_mean
    return tuple(int(m * 255) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))


def load_image_processor(name_or_path: str, **kwargs):
    # Pin the PIL backend: the default depends on whether torchvision is installed, and the two give
    # slightly different pixels; a model must see the same pixels on every machine.
    return AutoImageProcessor.from_pretrained(name_or_path, backend="pil", **kwargs)


def _size_dict(size) -> dict:
    """An image processor's size (a SizeDict in transformers 5, a dict before) as a plain dict of what is set."""
    if not size:
        return {}
    items = size.items() if isinstance(size, dict) else vars(size).items()
    return {key: value for key, value in items if value is not None}


def _flatten(images) -> list:
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, Path)):
        return [images]
    flat = []
    for item in images:
        flat.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return flat
