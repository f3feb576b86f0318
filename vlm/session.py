"""A multi-turn chat about one image that keeps its KV cache between turns."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from vlm.model import VLM, CallbackStreamer
from vlm.processor import VLMProcessor


class ChatSession:
    """Each turn feeds the model only what is new: the tower runs once, earlier turns stay in the cache.

    The conversation is formatted by the model's own chat template; the tokens the model has already
    seen are kept, and the next turn appends the text the template adds after them. Where a template
    re-renders earlier text differently from what was generated, the turn falls back to encoding the
    whole conversation again (counted in ``full_reencodes``).
    """

    def __init__(self, model: VLM, processor: VLMProcessor, image: Image.Image | None,
                 max_new_tokens: int = 256, temperature: float = 0.0, system: str | None = None) -> None:
        self.model, self.processor = model, processor
        self.pixel_values = processor.preprocess_images([image]) if image is not None else None
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.token_ids: torch.Tensor | None = None  # everything the model has seen or said
        self.cache = None
        self.full_reencodes = 0

    def _render(self) -> str:
        return self.processor.expand_image_tokens(self.processor.apply_chat_template(self.messages))

    def _encode(self, text: str) -> torch.Tensor:
        return self.processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        first = not any(m["role"] == "user" for m in self.messages)
        image_tag = f"{self.processor.image_token}\n" if first and self.pixel_values is not None else ""
        self.messages.append({"role": "user", "content": image_tag + question})
        rendered = self._render()
        pixel_values = None
        if self.token_ids is None:
            token_ids, pixel_values, cache = self._encode(rendered), self.pixel_values, None
        else:
            seen = self.processor.tokenizer.decode(self.token_ids[0], skip_special_tokens=False,
                                                   clean_up_tokenization_spaces=False)
            if rendered.startswith(seen):
                token_ids = torch.cat([self.token_ids, self._encode(rendered[len(seen):])], dim=1)
                cache = self.cache
            else:
                self.full_reencodes += 1
                token_ids, pixel_values, cache = self._encode(rendered), self.pixel_values, None
        device = self.model.device
        streamer = CallbackStreamer(self.processor.tokenizer, on_text) if on_text else None
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        output = self.model.generate(
            input_ids=token_ids.to(device), attention_mask=torch.ones_like(token_ids, device=device),
            pixel_values=None if pixel_values is None else pixel_values.to(device),
            past_key_values=cache, max_new_tokens=self.max_new_tokens, streamer=streamer,
            return_dict_in_generate=True, pad_token_id=self.processor.tokenizer.pad_token_id, **sampling)
        self.token_ids = output.sequences.cpu()
        self.cache = output["cache"] if "cache" in output else output.past_key_values  # renamed in transformers 5.24
        new_tokens = output.sequences[0, token_ids.shape[1]:].tolist()
        if new_tokens and new_tokens[-1] == self.processor.tokenizer.eos_token_id:
            new_tokens = new_tokens[:-1]  # the template writes the end of turn itself
        # The history keeps the reply exactly as generated, so re-rendering it reproduces the cached tokens.
        said = self.processor.tokenizer.decode(new_tokens, skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False)
        self.messages.append({"role": "assistant", "content": said})
        return self.processor.decode(new_tokens).strip()
