"""The VLM: frozen vision tower -> projector -> any causal LM, images entering by a mask over ``<image>`` slots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, TextStreamer

from vlm.config import ModelConfig
from vlm.processor import VLMProcessor
from vlm.vision import VisionTower

try:  # transformers renamed generate's past_key_values to cache (5.24 warns on the old name)
    from transformers.generation.utils import ALL_CACHE_NAMES

    _CACHE_ARGUMENT = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
except ImportError:
    _CACHE_ARGUMENT = "past_key_values"

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
COMPONENT_DIRS = ("vision_tower", "language_model")  # what save_pretrained(full=True) writes beside config.json


class VLM(nn.Module):
    def __init__(self, config: ModelConfig, vision_tower: VisionTower, projector: nn.Module,
                 language_model: PreTrainedModel) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        head = language_model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_dense_rows)

    # ---- images -> visual tokens -> embeddings ------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor,
                       spatial_shapes: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Visual tokens ``[images, tokens_per_image, llm_width]`` (NaFlex: a list, ``[tokens_i, llm_width]`` each)."""
        return self._project(self.vision_tower(pixel_values, spatial_shapes))

    def _project(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(features, torch.Tensor):
            return self.projector(features.to(self.projector_dtype))
        return [self.projector(image[None].to(self.projector_dtype))[0] for image in features]  # ragged: one by one

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     vision_features: torch.Tensor | list[torch.Tensor] | None = None, start: int = 0,
                     spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the ``<image>`` slots from position ``start`` on overwritten by visual tokens.

        ``vision_features`` (the tower's output ``[images, patches, width]``, or a list of ``[patches_i, width]``
        for a NaFlex tower, e.g. from a feature cache) replaces running the tower; ``spatial_shapes`` goes with
        NaFlex pixels. Images fill the slots in order. Slots before ``start`` are already in a KV cache.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        slots = input_ids == self.config.image_token_id
        slots[:, :start] = False
        if vision_features is None and pixel_values is not None:
            vision_features = self.vision_tower(pixel_values, spatial_shapes)
        image_embeds = [] if vision_features is None else list(self._project(vision_features))
        counts = [image.shape[0] for image in image_embeds]
        n_slots = int(slots.sum())
        if n_slots != sum(counts):
            per_image = self.config.tokens_per_image
            given = f" ({', '.join(map(str, counts))} each)" if len(set(counts)) > 1 else ""
            raise ValueError(f"input_ids hold {n_slots} image-token slots ({n_slots / per_image:g} image(s) at "
                             f"{per_image} tokens each) but {len(counts)} image(s) gave {sum(counts)} visual "
                             f"tokens{given}")
        if n_slots:
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), torch.cat(image_embeds).to(embeds.dtype))
        return embeds

    # ---- forward and generation ------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                vision_features: torch.Tensor | list[torch.Tensor] | None = None,
                spatial_shapes: torch.Tensor | None = None, **kwargs):
        """Returns the LM's output (``loss`` when ``labels`` are given, ``logits``, ``past_key_values``)."""
        embeds = self.embed_inputs(input_ids, pixel_values, vision_features, spatial_shapes=spatial_shapes)
        if labels is not None:  # a visual token is never a target
            labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                 past_key_values=None, spatial_shapes: torch.Tensor | None = None, **generate_kwargs):
        """Hugging Face ``generate`` over the joined embeddings: the tower runs once, the KV cache does the rest.

        Returns what ``generate`` returns: sequences that start with ``input_ids``. Passing the
        ``past_key_values`` of an earlier turn (``return_dict_in_generate=True``) continues a chat without
        re-encoding what the cache holds, the image included.
        """
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        embeds = self.embed_inputs(input_ids, pixel_values, vision_features, start=cached, spatial_shapes=spatial_shapes)
        if past_key_values is not None:  # only when continuing
            generate_kwargs[_CACHE_ARGUMENT] = past_key_values
        return self.language_model.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                                            **generate_kwargs)

    @torch.no_grad()
    def generate_shared(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                        **generate_kwargs) -> torch.Tensor:
        """Batched ``generate`` that runs each distinct image, with the prompt text all rows share, once.

        A VQA evaluation batch is mostly several questions about the same images under one prompt
        template, and on a CPU the image part of the prompt is most of the work. Rows are unpadded with
        ``attention_mask``; the shared prefix is the token prefix common to every row and must hold all
        image slots, and some image must repeat (otherwise this is plain ``generate``). Its KV cache is computed once per distinct
        image and copied to that image's rows; each row's own tokens follow it right-aligned, the gap
        masked out and positions continuing from the prefix, so a row sees what it would see alone.
        Returns only the new tokens, ``[rows, new]`` (with ``return_dict_in_generate``, the output with
        ``sequences`` cut to them).
        """
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask, strict=True)]
        shortest = min(len(r) for r in rows)
        same = torch.stack([r[:shortest] for r in rows]).eq(rows[0][:shortest]).all(0)
        prefix = int(same.long().cumprod(0).sum().clamp(max=shortest - 1))  # every row keeps a token to run
        slots_after = any(bool((r[prefix:] == self.config.image_token_id).any()) for r in rows)
        ragged = generate_kwargs.get("spatial_shapes") is not None  # NaFlex pixels: plain generate
        if prefix == 0 or slots_after or ragged or pixel_values is None or len(pixel_values) != len(rows):
            return _new_tokens(self.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             pixel_values=pixel_values, **generate_kwargs), input_ids.shape[1])
        distinct: list[torch.Tensor] = []
        image_of_row = []
        for pixels in pixel_values:
            match = next((i for i, seen in enumerate(distinct) if torch.equal(seen, pixels)), None)
            if match is None:
                distinct.append(pixels)
                match = len(distinct) - 1
            image_of_row.append(match)
        if len(distinct) == len(rows):  # nothing to share: plain batched generation does the same work
            return _new_tokens(self.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             pixel_values=pixel_values, **generate_kwargs), input_ids.shape[1])
        shared = rows[0][:prefix].expand(len(distinct), -1)
        # Only the cache is needed: no logits over the prefix (8 x 600 positions x a 152k vocabulary is 2.9 GB).
        prefill = self.language_model(inputs_embeds=self.embed_inputs(shared, torch.stack(distinct)), use_cache=True,
                                      logits_to_keep=1)
        cache = prefill[_CACHE_ARGUMENT] if _CACHE_ARGUMENT in prefill else prefill.past_key_values
        cache.batch_select_indices(torch.tensor(image_of_row, device=input_ids.device))
        width = max(len(r) for r in rows) - prefix
        pad = self.language_model.config.pad_token_id or 0
        tails = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros(len(rows), prefix + width, dtype=attention_mask.dtype, device=input_ids.device)
        mask[:, :prefix] = 1
        for i, r in enumerate(rows):
            tails[i, width - (len(r) - prefix):] = r[prefix:]
            mask[i, prefix + width - (len(r) - prefix):] = 1
        full = torch.cat([shared[:1].expand(len(rows), -1), tails], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return _new_tokens(self.generate(input_ids=full, attention_mask=mask, past_key_values=cache,
                                         position_ids=positions, **generate_kwargs), full.shape[1])

    # ---- what trains ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def parameter_groups(self) -> dict[str, nn.Module]:
        return {"vision_tower": self.vision_tower, "projector": self.projector, "language_model": self.language_model}

    # ---- save ----------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, processor: VLMProcessor, full: bool = True,
                        adapter: bool = False) -> None:
        """One folder that describes itself: ``config.json``, the projector, and (``full``) the tower and LM.

        With ``full=False`` (a stage-1 result) the config keeps pointing at the tower and LM it was
        built from, and only the projector is written. ``adapter=True`` records that the folder needs its
        LoRA adapter in ``<out_dir>/adapter`` (the caller writes it there); loading refuses without one.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = ModelConfig(**vars(self.config))
        config.adapter = adapter
        if full:
            towers = getattr(self.vision_tower, "towers", [self.vision_tower])
            folders = ["vision_tower"] if len(towers) == 1 else [f"vision_tower/{k}" for k in range(len(towers))]
            for tower, image_processor, folder in zip(towers, processor.image_processors, folders, strict=True):
                tower.encoder.save_pretrained(out / folder)
                image_processor.save_pretrained(out / folder)
            self.language_model.save_pretrained(out / "language_model")
            processor.tokenizer.save_pretrained(out / "language_model")
            config.vision_tower = folders[0] if len(folders) == 1 else folders
            config.language_model = "language_model"
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, out / PROJECTOR_FILE)
        config.to_json_file(out / "config.json")


def _new_tokens(output, prompt_length: int):
    if isinstance(output, torch.Tensor):
        return output[:, prompt_length:]
    output.sequences = output.sequences[:, prompt_length:]
    return output


def _dense_rows(module: nn.Module, args: tuple) -> tuple | None:
    """Hand lm_head a densely laid-out input when prefill gives it the last position's slice.

    That slice (``hidden[:, -1:]``) keeps the whole prompt's stride; with a frozen weight, torch's CPU
    bf16 matmul then copies the whole vocabulary matrix on every call (measured: 1.3 s of a 7 s first
    token for Qwen2.5-0.5B, benchmarks/README.md). Copying the one row costs nothing.
    """
    hidden = args[0]
    if hidden.dim() > 1 and hidden.stride(0) != hidden[0].numel():
        return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])  # .contiguous() keeps the stride
    return None


class CallbackStreamer(TextStreamer):
    """Streams decoded text of the new tokens to a callback as it comes (``generate(streamer=...)``)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)
