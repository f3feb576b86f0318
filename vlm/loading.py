"""Loading models: a project folder, a Hugging Face Llava folder, an original LLaVA folder or a hub id.

``build_vlm`` assembles a VLM from its config (tower, LM, ``<image>``, projector); ``load_pretrained`` reads a
folder of any of the three kinds. This module sits above the model and the format readers (vlm.hf_llava,
vlm.llava_original), so that they use the model without importing each other or this module back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from vlm.chat_templates import resolve_chat_template
from vlm.config import ModelConfig
from vlm.hf_llava import import_llava
from vlm.llava_lm import is_original_llava, language_model_config, original_language_model
from vlm.llava_original import (
    is_stage1_folder,
    load_original_llava,
    load_stage1_projector,
    read_stage1,
    stage1_config,
)
from vlm.model import ADAPTER_DIR, COMPONENT_DIRS, PROJECTOR_FILE, VLM
from vlm.processor import VLMProcessor, load_image_processor, load_tokenizer, pixel_side
from vlm.projector import PROJECTORS, projector_kind
from vlm.vision import FusedTower, VisionTower, load_vision_encoder
from vlm.weights import (
    LOAD_ERRORS,
    ModelFolderError,
    check_weight_files,
    four_bit,
    load_complete,
    make_room_for,
    resolve_reference,
    some,
    torch_dtype,
)

__all__ = ["LOAD_ERRORS", "ModelFolderError", "build_vlm", "load_complete", "load_pretrained"]


def _component(root: Path | None, reference: str, what: str) -> str:
    """Where a tower or LM lives; a folder the config declares (inside ``root``, or a local path) must exist."""
    resolved = resolve_reference(root, reference)
    if resolved == reference and not Path(reference).exists():
        if root is not None and reference.split("/")[0] in COMPONENT_DIRS:
            raise ModelFolderError(f"{root / 'config.json'} declares its {what} in {root / reference}, which is "
                                   "missing")
        if Path(reference).is_absolute() or reference.startswith((".", "~")):
            raise ModelFolderError(f"the {what} folder {reference} does not exist")
    if Path(resolved).is_dir() and (root is None or not Path(resolved).is_relative_to(root)):
        check_weight_files(resolved)  # a folder inside root was checked with it
    return resolved


def _load_projector(projector: nn.Module, file: Path) -> None:
    """The saved projector, every tensor present and of the right shape, or one line naming the file."""
    saved = load_file(file)
    wanted = projector.state_dict()
    missing = sorted(set(wanted) - set(saved))
    mismatched = sorted(f"{k} ({tuple(saved[k].shape)} in the file, {tuple(wanted[k].shape)} in the config)"
                        for k in set(wanted) & set(saved) if saved[k].shape != wanted[k].shape)
    unexpected = sorted(set(saved) - set(wanted))
    if missing or mismatched or unexpected:
        problems = [f"{label} {some(names)}" for label, names in
                    (("lacks", missing), ("mis-shaped", mismatched), ("has unknown", unexpected)) if names]
        raise ModelFolderError(f"{file}: {'; '.join(problems)} (projector {type(projector).__name__})")
    projector.load_state_dict(saved)


class _OriginalLM:
    """An original LLaVA folder named as a language model: its LM is read from LLaVA's shards."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.config = language_model_config(json.loads((Path(path) / "config.json").read_text()), Path(path))

    def load(self, dtype: torch.dtype, load_in_4bit: bool) -> PreTrainedModel:
        return original_language_model(self.path, dtype, load_in_4bit)


def _original_llava_folder(path: str) -> _OriginalLM | None:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        values = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{config_file} is not valid JSON: {error}") from None
    return _OriginalLM(path) if isinstance(values, dict) and is_original_llava(values) else None


def build_vlm(config: ModelConfig, root: str | Path | None = None, load_in_4bit: bool = False,
              device: str | torch.device | None = None) -> tuple[VLM, VLMProcessor]:
    """Assemble a VLM from its config: load tower and LM, add ``<image>``, and load the projector if saved.

    ``root`` is the folder the config came from: components, ``projector.safetensors`` and (when the config
    declares one) the LoRA ``adapter/`` must be there, every weight file complete, or this raises
    :class:`ModelFolderError`. Without a root, the projector starts from random initialisation.
    """
    root = Path(root) if root is not None else None
    if root is not None:  # refuse an incomplete folder before loading anything big
        check_weight_files(root)
        if not (root / PROJECTOR_FILE).is_file():
            raise ModelFolderError(f"{root / PROJECTOR_FILE} is missing: the model folder has no projector weights")
        if config.adapter and not (root / ADAPTER_DIR / "adapter_config.json").is_file():
            raise ModelFolderError(f"{root / 'config.json'} declares a LoRA adapter but {root / ADAPTER_DIR} holds "
                                   "none (adapter_config.json): the stage-2 result is incomplete")
    kind = projector_kind(config.projector)
    dtype = torch_dtype(config.dtype)
    tower_names = config.vision_tower if isinstance(config.vision_tower, list) else [config.vision_tower]
    tower_paths = [_component(root, name, "vision tower") for name in tower_names]
    llm_path = _component(root, config.language_model, "language model")

    image_processors = [load_image_processor(path) for path in tower_paths]
    towers = [VisionTower(load_complete(load_vision_encoder, path, dtype=dtype), config.vision_feature_layer,
                          config.vision_feature_select, pixel_side(image_processor))
              for path, image_processor in zip(tower_paths, image_processors, strict=True)]
    tower = towers[0] if len(towers) == 1 else FusedTower(towers, config.image_size)
    if tower.naflex and (config.image_size or kind.even_square_grid):
        grids = [name for name, other in PROJECTORS.items() if other.even_square_grid]
        raise ValueError("a NaFlex tower keeps each image's shape within its patch budget: leave model.image_size "
                         f"unset and use a projector other than {' or '.join(grids)} (odd patch grids)")
    original = _original_llava_folder(llm_path)  # a stage-2 result trained from an original LLaVA folder
    tokenizer = load_tokenizer(llm_path, config.image_token, **({"config": original.config} if original else {}))
    if config.chat_template:  # e.g. vicuna_v1: Vicuna's tokenizer carries no template of its own
        tokenizer.chat_template = resolve_chat_template(config.chat_template)
    quantization = four_bit(dtype) if load_in_4bit else None
    if original:
        language_model = original.load(dtype, load_in_4bit)
    else:
        language_model = load_complete(AutoModelForCausalLM.from_pretrained, llm_path, dtype=dtype,
                                       quantization_config=quantization, ignore_mismatched_sizes=True)
    image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    # Grow only as far as <image> needs: a tokenizer may list more tokens than the LM has rows, and a
    # saved model must load back with its vocabulary unchanged.
    make_room_for(language_model, image_token_id + 1)
    if config.image_token_id is not None and config.image_token_id != image_token_id:
        raise ValueError(f"{config.image_token} has id {image_token_id} in tokenizer {llm_path} but the config "
                         f"was saved with id {config.image_token_id}")
    # A placeholder is never a token to generate.
    language_model.generation_config.suppress_tokens = sorted(
        set(language_model.generation_config.suppress_tokens or []) | {image_token_id})
    language_model.requires_grad_(False)

    image_size = config.image_size or tower.native_image_size
    config.image_token_id = image_token_id
    config.tokens_per_image = kind.tokens(tower.tokens_per_image(image_size), config.projector_queries)
    projector = kind.build(tower.hidden_size, language_model.config.hidden_size, config.projector_queries).to(dtype)
    if root is not None:
        _load_projector(projector, root / PROJECTOR_FILE)

    if root is not None and (root / ADAPTER_DIR / "adapter_config.json").is_file():
        from peft import PeftModel  # a stage-2 result: base LM + LoRA adapter, not merged yet

        language_model = PeftModel.from_pretrained(language_model, root / ADAPTER_DIR)
    model = VLM(config, tower, projector, language_model)
    if device is not None and not load_in_4bit:
        model.to(device)
    variable = tower.variable_tokens and not kind.fixed_tokens
    processor = VLMProcessor(tokenizer, image_processors if len(towers) > 1 else image_processors[0],
                             config.tokens_per_image, config.image_token, config.image_size, config.image_aspect,
                             config.split_at_images, variable)
    return model, processor


def load_pretrained(name_or_path: str | Path, load_in_4bit: bool = False, device: str | torch.device | None = None,
                    dtype: str | None = None, base: ModelConfig | None = None) -> tuple[VLM, VLMProcessor]:
    """Load a project folder, a Hugging Face Llava folder or an original (haotian-liu) LLaVA folder, or hub ids.

    ``base`` names the LM and tower a LLaVA stage-1 folder (``mm_projector.bin`` only) is put on.
    """
    root = Path(name_or_path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(str(name_or_path)))
        except Exception as error:  # the hub client raises many types; all mean "not here"
            raise FileNotFoundError(f"model {name_or_path} is neither a folder nor a reachable hub repository "
                                    f"({type(error).__name__})") from None
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model folder {root} has no config.json")
    try:
        values = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    model_type = values.get("model_type")
    if is_original_llava(values) and is_stage1_folder(root):
        return _on_base(root, values, base, load_in_4bit, device, dtype)
    if is_original_llava(values):
        return load_original_llava(root, values, load_in_4bit=load_in_4bit, device=device, dtype=dtype)
    if model_type == "llava":
        return import_llava(root, device=device, dtype=dtype)
    if model_type != "vlm":
        raise ValueError(f"{config_file} has model_type {model_type!r}; expected 'vlm', 'llava' or "
                         "'llava_llama'")
    config = ModelConfig.from_json_file(config_file)
    if dtype is not None:
        config.dtype = dtype
    return build_vlm(config, root, load_in_4bit=load_in_4bit, device=device)


def _on_base(root: Path, values: dict, base: ModelConfig | None, load_in_4bit: bool,
             device: str | torch.device | None, dtype: str | None) -> tuple[VLM, VLMProcessor]:
    """A LLaVA stage-1 folder (``mm_projector.bin`` only): its projector on ``base``'s LM and tower."""
    config = stage1_config(root, values, base, dtype)
    tensors = read_stage1(root)
    model, processor = build_vlm(config, None, load_in_4bit=load_in_4bit, device=device)
    load_stage1_projector(model.projector, config.projector, tensors, root)
    return model, processor
