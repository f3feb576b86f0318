"""A multi-turn chat about one image that keeps its KV cache between turns."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from vlm.model import VLM, CallbackStreamer
from vlm.processor import VLMProcessor


class ChatSession:
    """Each turn feeds the model only what is new: the tower runs once, earlier turns stay in the cache.

    The conversation is formatted by the model's own chat template and tokenized by the processor's rule
    (LLaVA's), so turn 1 is exactly the processor's prompt. The tokens the model has already seen or said
    are kept; the next turn appends the tokens that the whole conversation, tokenized afresh, has after
    that text. Where the template re-renders earlier text differently from what was generated, or a token
    would straddle the seam, the turn encodes the whole conversation again (counted in ``full_reencodes``).
    """

    def __init__(self, model: VLM, processor: VLMProcessor, image: Image.Image | None,
                 max_new_tokens: int = 256, temperature: float = 0.0, system: str | None = None) -> None:
        self.model, self.processor = model, processor
        images = processor.preprocess([image]) if image is not None else {}
        self.pixel_values = images.get("pixel_values")
        self.spatial_shapes = images.get("spatial_shapes")  # NaFlex towers: the picture's own patch grid
        self.image_tokens = processor.image_tokens(self.spatial_shapes, 1) if image is not None else None
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.token_ids: torch.Tensor | None = None  # everything the model has seen or said
        self.seen: str | None = None  # the text of token_ids as the template renders it (None: unknown)
        self.cache = None
        self.full_reencodes = 0

    def _continuation(self, rendered: str) -> torch.Tensor | None:
        """The tokens of ``rendered`` after the text already seen, as tokenizing it whole gives them."""
        if self.token_ids is None or self.seen is None or not rendered.startswith(self.seen):
            return None
        ids, spans = self.processor.encode_with_offsets(rendered, image_tokens=self.image_tokens)
        seam = len(self.seen)
        before = sum(start < seam for start, _ in spans)
        if any(end > seam for _, end in spans[:before]) or any(start < seam for start, _ in spans[before:]):
            return None
        return torch.tensor([ids[before:]], dtype=self.token_ids.dtype)

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        first = not any(m["role"] == "user" for m in self.messages)
        image_tag = f"{self.processor.image_token}\n" if first and self.pixel_values is not None else ""
        self.messages.append({"role": "user", "content": image_tag + question})
        rendered = self.processor.apply_chat_template(self.messages)
        tail, pixel_values, cache = self._continuation(rendered), None, self.cache
        if tail is not None:
            token_ids = torch.cat([self.token_ids, tail], dim=1)
        else:
            self.full_reencodes += self.token_ids is not None
            token_ids = torch.tensor([self.processor.encode(rendered, image_tokens=self.image_tokens)])
            pixel_values, cache = self.pixel_values, None
        device = self.model.device
        streamer = CallbackStreamer(self.processor.tokenizer, on_text) if on_text else None
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        output = self.model.generate(
            input_ids=token_ids.to(device), attention_mask=torch.ones_like(token_ids, device=device),
            pixel_values=None if pixel_values is None else pixel_values.to(device),
            **({} if pixel_values is None or self.spatial_shapes is None else {"spatial_shapes": self.spatial_shapes.to(device)}),
            past_key_values=cache, max_new_tokens=self.max_new_tokens, streamer=streamer,
            return_dict_in_generate=True, pad_token_id=self.processor.tokenizer.pad_token_id, **sampling)
        self.token_ids = output.sequences.cpu()
        self.cache = output["cache"] if "cache" in output else output.past_key_values  # renamed in transformers 5.24
        tokenizer = self.processor.tokenizer
        # What was said as it reads after the prompt (a Llama decoder drops a leading space of a text on its own).
        context = tokenizer.decode(token_ids[0], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        everything = tokenizer.decode(self.token_ids[0], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self.seen = rendered + everything[len(context):] if everything.startswith(context) else None
        new_tokens = self.token_ids[0, token_ids.shape[1]:].tolist()
        if new_tokens and new_tokens[-1] == tokenizer.eos_token_id:
            new_tokens = new_tokens[:-1]  # the template writes the end of turn itself
        # The history keeps the reply exactly as generated, so re-rendering it reproduces the cached tokens.
        said = tokenizer.decode(new_tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self.messages.append({"role": "assistant", "content": said})
        return self.processor.decode(new_tokens).strip()
