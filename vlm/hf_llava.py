"""Hugging Face Llava interop: the folder ``LlavaForConditionalGeneration`` and ``AutoProcessor`` read, both ways.

Weights move module by module (same tensors, no renaming by hand): transformers itself then writes and
reads the Llava checkpoint layout, including the older llava-hf key names it maps on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from vlm.config import ModelConfig
from vlm.model import VLM
from vlm.processor import VLMProcessor, pixel_side
from vlm.projector import MLPProjector
from vlm.vision import VisionTower
from vlm.weights import check_weight_files, load_complete, torch_dtype


class ExportError(ValueError):
    pass


def _llava_strategy(tower: VisionTower) -> str:
    # Llava's "default" drops exactly one leading token (CLIP's CLS); "full" keeps everything.
    if not isinstance(tower, VisionTower) or tower.naflex or tower.select == "pooled":
        raise ExportError("cannot export because Llava holds one fixed-resolution tower's hidden states only (not "
                          "fused towers, NaFlex patches or a pooled output)")
    if tower.select == "patch" and tower.prefix_tokens == 1:
        return "default"
    if tower.select == "cls_patch" or tower.prefix_tokens == 0:
        return "full"
    raise ExportError(f"cannot export because the tower has {tower.prefix_tokens} prefix tokens to drop and Llava "
                      "can drop only one")


def _aspect_of(image_processor) -> str:
    """The image_aspect whose rule is exactly what this Llava image processor does to a non-square picture."""
    if getattr(image_processor, "do_pad", False):
        return "pad"  # pad to a square with int(mean * 255), as VLMProcessor does, then its own resize and crop
    return "crop" if getattr(image_processor, "do_center_crop", False) else "resize"


def export_llava(model: VLM, processor: VLMProcessor, out_dir: str | Path) -> Path:
    """Write ``model`` as a Hugging Face Llava folder (mlp2x_gelu projector only)."""
    config = model.config
    if config.projector != "mlp2x_gelu":
        raise ExportError(f"cannot export because Llava's projector is mlp2x_gelu and this model's is "
                          f"{config.projector!r}")
    tower = model.vision_tower
    strategy = _llava_strategy(tower)
    side = config.image_size or tower.native_image_size
    # Llava calls the tower without interpolate_pos_encoding; one that always interpolates (DINOv2) takes any side.
    if tower.interpolates and side != tower.encoder.config.image_size:
        raise ExportError(f"cannot export because Llava does not interpolate position embeddings: the model "
                          f"reads {side}-px images with a {tower.encoder.config.image_size}-px tower")
    if hasattr(model.language_model, "peft_config"):
        raise ExportError("cannot export because the LM still has LoRA adapters: merge them first (python -m vlm.merge)")
    llm = model.language_model
    llava_config = LlavaConfig(
        vision_config=tower.encoder.config.to_dict(), text_config=llm.config.to_dict(),
        image_token_index=config.image_token_id, image_seq_length=config.tokens_per_image,
        vision_feature_layer=tower.feature_layer, vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
    llava.model.vision_tower = tower.encoder
    llava.model.multi_modal_projector.load_state_dict(model.projector.state_dict(), assign=True)
    llava.model.language_model = llm.get_decoder()
    llava.lm_head = llm.get_output_embeddings()
    llava.generation_config = llm.generation_config
    out = Path(out_dir)
    llava.save_pretrained(out)

    # The same pixels: Llava's processor pads with the same int(mean * 255) colour, then resizes and crops
    # by the rule this model's processor uses for its aspect.
    source = processor.image_processor
    image_processor = LlavaImageProcessorPil(
        do_pad=config.image_aspect == "pad", image_mean=list(source.image_mean), image_std=list(source.image_std),
        resample=source.resample, rescale_factor=source.rescale_factor, **processor.pixel_rule(config.image_aspect))
    template = content_list_template(processor.tokenizer.chat_template, config.image_token)
    LlavaProcessor(image_processor=image_processor, tokenizer=processor.tokenizer, patch_size=tower.patch_size,
                   vision_feature_select_strategy=strategy, image_token=config.image_token,
                   num_additional_image_tokens=tower.prefix_tokens, chat_template=template).save_pretrained(out)
    return out


def content_list_template(template: str | None, image_token: str) -> str | None:
    """The LM's chat template, taking a message's ``content`` as text or as transformers' list of parts.

    ``[{"type": "image"}, {"type": "text", "text": "What is shown?"}]`` becomes ``"<image>\\nWhat is shown?"``
    before the template runs: the images first, a newline, then the text, as LLaVA's training data and
    llava-hf's templates have it, so either form renders the same prompt. A template that already starts
    so (an imported Llava folder exported again) is returned as it is.
    """
    token = json.dumps(image_token)  # a Jinja string literal
    prelude = (
        "{%- set parts = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string or message['content'] is none -%}"
        "{%- set parts.messages = parts.messages + [message] -%}"
        "{%- else -%}"
        "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join -%}"
        f"{{%- set parts.messages = parts.messages + [dict(message, content={token} * images + "
        "('\\n' if images else '') + text)] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = parts.messages -%}"
    )
    return template if template is None or template.startswith(prelude) else prelude + template


def import_llava(path: str | Path, device: str | torch.device | None = None,
                 dtype: str | None = None) -> tuple[VLM, VLMProcessor]:
    """Read a Hugging Face Llava folder into a project VLM that shares its weights and sees the same pixels.

    Every weight must come from the folder: a missing, mis-shaped or truncated one raises ModelFolderError.
    """
    check_weight_files(path)
    llava = load_complete(LlavaForConditionalGeneration.from_pretrained, path,
                          dtype=torch_dtype(dtype) if dtype else "auto", ignore_mismatched_sizes=True)
    llava_config = llava.config
    if not isinstance(llava_config.vision_feature_layer, int):
        raise ValueError("cannot import a Llava model that concatenates several vision layers")
    if llava_config.projector_hidden_act != "gelu" or not llava_config.multimodal_projector_bias:
        raise ValueError("cannot import: only the gelu projector with biases (mlp2x_gelu) is supported")
    hf_processor = AutoProcessor.from_pretrained(path, backend="pil")
    image_size = pixel_side(hf_processor.image_processor) or llava_config.vision_config.image_size
    tower = VisionTower(llava.model.vision_tower, llava_config.vision_feature_layer, "patch", image_size)
    select = {"default": "patch", "full": "cls_patch" if tower.prefix_tokens else "patch"}
    if llava_config.vision_feature_select_strategy == "default" and tower.prefix_tokens != 1:
        raise ValueError("cannot import: 'default' drops a token this tower does not have")
    tower.select = select[llava_config.vision_feature_select_strategy]

    projector = MLPProjector(tower.hidden_size, llava_config.text_config.hidden_size)
    projector.load_state_dict(llava.model.multi_modal_projector.state_dict(), assign=True)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llava_config.text_config)
    setattr(llm, llm.base_model_prefix, llava.model.language_model)
    llm.set_output_embeddings(llava.lm_head)
    llm.generation_config = llava.generation_config
    # As build_vlm does: a placeholder is never a token to generate (so a saved and reloaded import behaves the same).
    llm.generation_config.suppress_tokens = sorted(set(llm.generation_config.suppress_tokens or [])
                                                   | {llava_config.image_token_id})
    llm.requires_grad_(False)

    config = ModelConfig(
        vision_tower=str(path), language_model=str(path), projector="mlp2x_gelu",
        vision_feature_layer=llava_config.vision_feature_layer, vision_feature_select=tower.select,
        image_size=None, image_aspect=_aspect_of(hf_processor.image_processor),
        image_token=hf_processor.image_token, dtype=str(projector.linear_1.weight.dtype).removeprefix("torch."),
        image_token_id=llava_config.image_token_id,
        tokens_per_image=tower.tokens_per_image(image_size), split_at_images=False,  # LlavaProcessor's rule
    )
    model = VLM(config, tower, projector, llm)
    if device is not None:
        model.to(device)
    processor = VLMProcessor(hf_processor.tokenizer, hf_processor.image_processor, config.tokens_per_image,
                             config.image_token, None, config.image_aspect, config.split_at_images)
    return model, processor
