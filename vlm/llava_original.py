"""Original haotian-liu/LLaVA checkpoints (what most published LLaVA-1.5 models are), read as they are.

A folder holds the LM's ``config.json`` plus LLaVA's ``mm_*`` keys, and the Llama weights with the projector
(``model.mm_projector.*``) in the same shards; the tower is named by ``mm_vision_tower``. A stage-1
(pretrain) folder holds only ``mm_projector.bin``. Nothing is invented: every tensor the model needs comes
from the folder (checked by name and shape on the meta device before anything is allocated), and pickled
shards are only ever read with ``weights_only=True``. The config and shards are read in vlm.llava_lm; a
stage-1 folder goes on its base model in vlm.loading (it needs ``build_vlm``).

LLaVA splices an image's features in at a -200 placeholder id; here ``<image>`` is an added token repeated
once per visual token, so the LM's vocabulary grows by one row and the logits over the original rows equal LLaVA's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from vlm.chat_templates import resolve_chat_template
from vlm.config import ModelConfig
from vlm.llava_lm import (
    PROJECTOR_PREFIX,
    check_tensors,
    llava_settings,
    projector_state,
    read_pickle,
    read_weights,
    weight_files,
)
from vlm.model import VLM
from vlm.processor import VLMProcessor, load_image_processor, load_tokenizer
from vlm.projector import PROJECTORS, build_projector
from vlm.vision import VisionTower, load_vision_encoder
from vlm.weights import make_room_for, resolve_reference, torch_dtype

log = logging.getLogger(__name__)

STAGE1_FILE = "mm_projector.bin"


def is_stage1_folder(root: Path) -> bool:
    """A LLaVA stage-1 (pretrain) result: ``mm_projector.bin`` and no LM shards; it goes on a base LM and tower."""
    return not weight_files(root) and (root / STAGE1_FILE).is_file()


def load_original_llava(root: str | Path, config: dict | None = None, load_in_4bit: bool = False,
                        device: str | torch.device | None = None, dtype: str | None = None) -> tuple[VLM, VLMProcessor]:
    """A VLM from an original LLaVA folder that holds the whole model (a stage-1 folder: :func:`stage1_config`)."""
    root = Path(root)
    config = config if config is not None else json.loads((root / "config.json").read_text())
    settings = llava_settings(config, root)
    if not weight_files(root):
        raise FileNotFoundError(f"{root} holds no weights (model*.safetensors, pytorch_model*.bin or {STAGE1_FILE})")
    return _from_full(root, config, settings, load_in_4bit, device, dtype)


def _weights_dtypename(dtype: str | None, config: dict) -> str:
    # The checkpoint's own dtype (LLaVA-1.5: float16) unless the caller picks one.
    name = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    torch_dtype(name)
    return name


def _from_full(root: Path, config: dict, settings: dict, load_in_4bit: bool, device: str | torch.device | None,
               dtype: str | None) -> tuple[VLM, VLMProcessor]:
    if not isinstance(config.get("mm_vision_tower"), str):
        raise ValueError(f"{root / 'config.json'} names no mm_vision_tower")
    model_config = ModelConfig(vision_tower=resolve_reference(root, config["mm_vision_tower"]), language_model=str(root),
                               dtype=_weights_dtypename(dtype, config), **settings)
    weights_dtype = torch_dtype(model_config.dtype)
    language_model, projector_tensors = read_weights(root, config, settings["projector"], weights_dtype, load_in_4bit)
    tower = VisionTower(load_vision_encoder(model_config.vision_tower, dtype=weights_dtype),
                        model_config.vision_feature_layer, model_config.vision_feature_select)
    if tower.hidden_size != config["mm_hidden_size"]:
        raise ValueError(f"{root / 'config.json'}: mm_hidden_size is {config['mm_hidden_size']} but the tower "
                         f"{model_config.vision_tower} is {tower.hidden_size} wide")
    return _assemble(model_config, root, tower, language_model, projector_tensors, load_in_4bit, device)


def _legacy_default(root: Path) -> dict:
    """LLaVA's transformers (4.3x) read a Llama tokenizer config without ``legacy`` as legacy; transformers 5
    reads it as not, which changes the ids after every special token."""
    tokenizer_config = root / "tokenizer_config.json"
    if tokenizer_config.is_file() and "legacy" in json.loads(tokenizer_config.read_text()):
        return {}
    return {"legacy": True}


def _assemble(config: ModelConfig, root: Path, tower: VisionTower, language_model: PreTrainedModel,
              projector_tensors: dict[str, torch.Tensor], load_in_4bit: bool,
              device: str | torch.device | None) -> tuple[VLM, VLMProcessor]:
    """What build_vlm does after loading, for an LM that came from LLaVA's shards."""
    # The LM's config, lest transformers read LLaVA's config.json as some other model's.
    tokenizer = load_tokenizer(str(root), config.image_token, config=language_model.config, **_legacy_default(root))
    tokenizer.chat_template = resolve_chat_template(config.chat_template)  # Vicuna ships none
    make_room_for(language_model, len(tokenizer))
    config.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    # A placeholder is never a token to generate.
    language_model.generation_config.suppress_tokens = sorted(
        set(language_model.generation_config.suppress_tokens or []) | {config.image_token_id})
    language_model.requires_grad_(False)
    config.tokens_per_image = tower.tokens_per_image()
    projector = build_projector(config.projector, tower.hidden_size, language_model.config.hidden_size)
    projector.to(torch_dtype(config.dtype)).load_state_dict(projector_tensors)
    model = VLM(config, tower, projector, language_model)
    if device is not None and not load_in_4bit:
        model.to(device)
    processor = VLMProcessor(tokenizer, load_image_processor(config.vision_tower), config.tokens_per_image,
                             config.image_token, None, config.image_aspect)
    return model, processor


def stage1_config(root: Path, config: dict, base: ModelConfig | None, dtype: str | None) -> ModelConfig:
    """The model a stage-1 projector goes on: ``base``'s LM and tower; the projector's kind and features the folder's."""
    settings = llava_settings(config, root)
    language_model = base.language_model if base is not None else config.get("_name_or_path")
    if not language_model:
        raise ValueError(f"{root} is a LLaVA stage-1 folder (only {STAGE1_FILE}): name the language model to put "
                         "it on (model.language_model)")
    tower = base.vision_tower if base is not None else config.get("mm_vision_tower")
    if not tower:
        raise ValueError(f"{root / 'config.json'} names no mm_vision_tower")
    if base is not None and config.get("mm_vision_tower") not in (None, tower):
        log.warning("%s was trained on tower %s; putting it on %s", root, config["mm_vision_tower"], tower)
    # What the projector's weights mean comes from the folder; the run's own choices (pixels, template) stay.
    meaning = {k: settings[k] for k in ("projector", "vision_feature_layer", "vision_feature_select")}
    if base is not None:
        model_config = dataclasses.replace(base, vision_tower=tower, language_model=language_model, image_token_id=None,
                                           tokens_per_image=None, **meaning)
    else:
        model_config = ModelConfig(vision_tower=tower, language_model=language_model, **settings)
    model_config.dtype = dtype or model_config.dtype
    return model_config


def read_stage1(root: Path) -> dict[str, torch.Tensor]:
    """A stage-1 folder's projector tensors; read before any model loads, so a refused pickle fails fast."""
    return read_pickle(root / STAGE1_FILE)


def load_stage1_projector(projector: nn.Module, kind: str, tensors: dict[str, torch.Tensor], root: Path) -> None:
    """The tensors of :func:`read_stage1`, every name and shape checked, into a ``kind`` projector."""
    mine = projector.state_dict()
    needed = {PROJECTOR_PREFIX + theirs: tuple(mine[ours].shape) for theirs, ours in PROJECTORS[kind].llava_names.items()}
    check_tensors({name: tuple(t.shape) for name, t in tensors.items()}, needed, root / STAGE1_FILE)
    projector.load_state_dict(projector_state(kind, tensors))
