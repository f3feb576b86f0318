"""Original haotian-liu/LLaVA checkpoints (what most published LLaVA-1.5 models are), read as they are.

A folder holds the LM's ``config.json`` plus LLaVA's ``mm_*`` keys, and the Llama weights with the projector
(``model.mm_projector.*``) in the same shards; the tower is named by ``mm_vision_tower``. A stage-1
(pretrain) folder holds only ``mm_projector.bin``. Nothing is invented: every tensor the model needs comes
from the folder (checked by name and shape on the meta device before anything is allocated), and pickled
shards are only ever read with ``weights_only=True``.

LLaVA splices an image's features in at a -200 placeholder id; here ``<image>`` is an added token repeated
once per visual token, so the LM's vocabulary grows by one row and the logits over the original rows equal LLaVA's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, PreTrainedModel

from vlm.config import FEATURE_SELECTS, ModelConfig
from vlm.model import VLM, _make_room_for, _resolve, _torch_dtype, build_vlm
from vlm.processor import VLMProcessor, load_image_processor, load_tokenizer
from vlm.projector import build_projector
from vlm.vision import VisionTower, load_vision_encoder

log = logging.getLogger(__name__)

PROJECTOR_PREFIX = "model.mm_projector."
STAGE1_FILE = "mm_projector.bin"
# LLaVA's Sequential(Linear, GELU, Linear) numbering -> this project's projector attribute names.
PROJECTOR_NAMES = {
    "mlp2x_gelu": {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                   "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"},
    "linear": {"weight": "weight", "bias": "bias"},
}
IMAGE_ASPECTS = {"pad": "pad", "square": "crop", None: "crop"}  # LLaVA's unset/square: the CLIP processor's crop
# Written by LLaVA or by older transformers beside the Llama settings; not part of a plain Llama config.
LLAVA_ONLY_KEYS = {"architectures", "model_type", "_name_or_path", "transformers_version", "image_aspect_ratio",
                   "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
                   "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj", "unfreeze_mm_vision_tower",
                   "s2", "s2_scales", "s2_max_split_size"}
# Without these a Llama config falls back to 7B defaults: refuse rather than build something big by accident.
REQUIRED_LM_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def is_original_llava(config: dict) -> bool:
    """``llava_llama`` (current LLaVA), or ``llava`` as the released llava-v1.5 configs say it (not a HF Llava)."""
    if config.get("model_type") == "llava_llama":
        return True
    return config.get("model_type") == "llava" and (
        "LlavaLlamaForCausalLM" in (config.get("architectures") or []) or "mm_vision_tower" in config)


def load_original_llava(root: str | Path, config: dict | None = None, load_in_4bit: bool = False,
                        device: str | torch.device | None = None, dtype: str | None = None,
                        base: ModelConfig | None = None) -> tuple[VLM, VLMProcessor]:
    """A VLM from an original LLaVA folder; a stage-1 folder goes on ``base``'s LM and tower."""
    root = Path(root)
    config = config if config is not None else json.loads((root / "config.json").read_text())
    settings = _settings(config, root)
    if not weight_files(root):
        if (root / STAGE1_FILE).is_file():
            return _from_stage1(root, config, settings, base, load_in_4bit, device, dtype)
        raise FileNotFoundError(f"{root} holds no weights (model*.safetensors, pytorch_model*.bin or {STAGE1_FILE})")
    return _from_full(root, config, settings, load_in_4bit, device, dtype)


def _settings(config: dict, root: Path) -> dict:
    """The ModelConfig fields a LLaVA config decides, or one error naming what is not supported."""
    where = root / "config.json"
    if config.get("mm_use_im_start_end"):
        raise ValueError(f"{where}: mm_use_im_start_end=true (image start/end tokens) is not supported")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ValueError(f"{where}: mm_patch_merge_type={config['mm_patch_merge_type']!r} is not supported (only flat)")
    projector = config.get("mm_projector_type", "linear")  # LLaVA's own default
    if projector not in PROJECTOR_NAMES:
        raise ValueError(f"{where}: mm_projector_type={projector!r} is not supported (only linear and mlp2x_gelu)")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in FEATURE_SELECTS:
        raise ValueError(f"{where}: mm_vision_select_feature={select!r} is not one of {', '.join(FEATURE_SELECTS)}")
    layer = config.get("mm_vision_select_layer")
    if not isinstance(layer, int):
        raise ValueError(f"{where}: mm_vision_select_layer is missing or not an integer")
    aspect = config.get("image_aspect_ratio")
    if aspect not in IMAGE_ASPECTS:
        raise ValueError(f"{where}: image_aspect_ratio={aspect!r} is not supported (pad, square or unset)")
    if not isinstance(config.get("mm_hidden_size"), int):
        raise ValueError(f"{where}: mm_hidden_size (the tower's width) is missing")
    return dict(projector=projector, vision_feature_layer=layer, vision_feature_select=select,
                image_aspect=IMAGE_ASPECTS[aspect], chat_template="vicuna_v1")


def language_model_config(config: dict, root: Path) -> LlamaConfig:
    """The LM's config: LLaVA's config without its ``mm_*`` and training keys, as a plain Llama."""
    missing = [key for key in REQUIRED_LM_KEYS if not isinstance(config.get(key), int)]
    if missing:
        raise ValueError(f"{root / 'config.json'} lacks {', '.join(missing)}: cannot build its language model")
    return LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("mm_") and k not in LLAVA_ONLY_KEYS})


def weight_files(root: Path) -> list[Path]:
    """The folder's LM shards: safetensors first, else pickled ``pytorch_model*.bin``; an index must be complete."""
    for index_name, pattern in (("model.safetensors.index.json", "model*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = root / index_name
        if index.is_file():
            files = [root / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} lists shard(s) that are not there: {', '.join(absent)}")
            return files
        files = sorted(root.glob(pattern))
        if files:
            return files
    return []


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, read with ``weights_only`` (no code runs) and memory-mapped (nothing read yet)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # UnpicklingError for a forbidden object, RuntimeError for a torn or old file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} cannot be read as plain tensors (refused: {reason})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return tensors


class Shards:
    """The tensors of a folder's weight files: names and shapes first, data only when asked for."""

    def __init__(self, files: list[Path]) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._file: dict[str, Path] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        for file in files:
            if file.suffix == ".safetensors":
                with safe_open(file, "pt") as opened:
                    names = {name: tuple(opened.get_slice(name).get_shape()) for name in opened.keys()}
            else:
                self._pickled[file] = read_pickle(file)
                names = {name: tuple(t.shape) for name, t in self._pickled[file].items()}
            self.shapes.update(names)
            self._file.update(dict.fromkeys(names, file))

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for file in dict.fromkeys(self._file[n] for n in names):
            wanted = [n for n in names if self._file[n] == file]
            if file in self._pickled:
                out.update({n: self._pickled[file][n] for n in wanted})
            else:
                with safe_open(file, "pt") as opened:
                    out.update({n: opened.get_tensor(n) for n in wanted})
        return out


def check_tensors(found: dict[str, tuple[int, ...]], needed: dict[str, tuple[int, ...]], where: Path,
                  optional: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Fail on the first missing or misshapen tensors; log the unused ones. Returns the names to load."""
    missing = [name for name in needed if name not in found and name not in optional]
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) the model needs: {_names(missing)}")
    misshapen = [name for name in needed if name in found and found[name] != needed[name]]
    if misshapen:
        name = misshapen[0]
        raise ValueError(f"{where}: tensor {name} has shape {list(found[name])} but the config needs "
                         f"{list(needed[name])} ({len(misshapen)} tensor(s) differ)")
    # Older transformers saved the rotary buffer, which is recomputed from the config.
    unused = [name for name in found if name not in needed and not name.endswith("rotary_emb.inv_freq")]
    if unused:
        log.warning("%s: %d tensor(s) not used: %s", where, len(unused), _names(unused))
    return [name for name in needed if name in found]


def _names(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _projector_shapes(kind: str, vision_width: int, llm_width: int) -> dict[str, tuple[int, ...]]:
    """The projector's tensors under LLaVA's names, with their shapes (built on meta: nothing allocated)."""
    with torch.device("meta"):
        ours = build_projector(kind, vision_width, llm_width).state_dict()
    return {PROJECTOR_PREFIX + theirs: tuple(ours[mine].shape) for theirs, mine in PROJECTOR_NAMES[kind].items()}


def _projector_state(kind: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {mine: tensors[PROJECTOR_PREFIX + theirs] for theirs, mine in PROJECTOR_NAMES[kind].items()}


def _dtype_name(dtype: str | None, config: dict) -> str:
    # The checkpoint's own dtype (LLaVA-1.5: float16) unless the caller picks one.
    name = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    _torch_dtype(name)
    return name


def _from_full(root: Path, config: dict, settings: dict, load_in_4bit: bool, device: str | torch.device | None,
               dtype: str | None) -> tuple[VLM, VLMProcessor]:
    if not isinstance(config.get("mm_vision_tower"), str):
        raise ValueError(f"{root / 'config.json'} names no mm_vision_tower")
    model_config = ModelConfig(vision_tower=_resolve(root, config["mm_vision_tower"]), language_model=str(root),
                               dtype=_dtype_name(dtype, config), **settings)
    torch_dtype = _torch_dtype(model_config.dtype)
    language_model, projector_state = _read_weights(root, config, settings["projector"], torch_dtype, load_in_4bit)
    tower = VisionTower(load_vision_encoder(model_config.vision_tower, dtype=torch_dtype),
                        model_config.vision_feature_layer, model_config.vision_feature_select)
    if tower.hidden_size != config["mm_hidden_size"]:
        raise ValueError(f"{root / 'config.json'}: mm_hidden_size is {config['mm_hidden_size']} but the tower "
                         f"{model_config.vision_tower} is {tower.hidden_size} wide")
    return _assemble(model_config, root, tower, language_model, projector_state, load_in_4bit, device)


def _read_weights(root: Path, config: dict, projector: str, dtype: torch.dtype,
                  load_in_4bit: bool) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """The LM and the projector's tensors from the shards; every name and shape is checked before any is read."""
    lm_config = language_model_config(config, root)
    shards = Shards(weight_files(root))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(lm_config)
    needed = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    needed.update(_projector_shapes(projector, config["mm_hidden_size"], lm_config.hidden_size))
    tied = {"lm_head.weight"} if lm_config.tie_word_embeddings else set()
    tensors = shards.tensors(check_tensors(shards.shapes, needed, root, optional=tied))
    lm_state = {name: tensor for name, tensor in tensors.items() if not name.startswith(PROJECTOR_PREFIX)}
    return load_language_model(lm_config, lm_state, dtype, load_in_4bit), _projector_state(projector, tensors)


def original_language_model(path: str | Path, dtype: torch.dtype = torch.float32,
                            load_in_4bit: bool = False) -> PreTrainedModel:
    """The LM of an original LLaVA folder alone (for a saved config whose language_model names such a folder)."""
    root = Path(path)
    config = json.loads((root / "config.json").read_text())
    return _read_weights(root, config, _settings(config, root)["projector"], dtype, load_in_4bit)[0]


def load_language_model(lm_config: LlamaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                        load_in_4bit: bool = False) -> PreTrainedModel:
    """The LM from a checked state dict (transformers builds it on meta and quantizes as it loads)."""
    quantization = None
    if load_in_4bit:  # as build_vlm: NF4 linear layers, lm_head in full precision
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"])
    model_class = AutoModelForCausalLM._model_mapping[type(lm_config)]
    return model_class.from_pretrained(None, config=lm_config, state_dict=state, dtype=dtype,
                                       quantization_config=quantization)


def _legacy_default(root: Path) -> dict:
    """LLaVA's transformers (4.3x) read a Llama tokenizer config without ``legacy`` as legacy; transformers 5
    reads it as not, which changes the ids after every special token."""
    tokenizer_config = root / "tokenizer_config.json"
    if tokenizer_config.is_file() and "legacy" in json.loads(tokenizer_config.read_text()):
        return {}
    return {"legacy": True}


def _assemble(config: ModelConfig, root: Path, tower: VisionTower, language_model: PreTrainedModel,
              projector_state: dict[str, torch.Tensor], load_in_4bit: bool,
              device: str | torch.device | None) -> tuple[VLM, VLMProcessor]:
    """What build_vlm does after loading, for an LM that came from LLaVA's shards."""
    from vlm.data.templates import resolve_chat_template

    # The LM's config, lest transformers read LLaVA's config.json as some other model's.
    tokenizer = load_tokenizer(str(root), config.image_token, config=language_model.config, **_legacy_default(root))
    tokenizer.chat_template = resolve_chat_template(config.chat_template)  # Vicuna ships none
    _make_room_for(language_model, len(tokenizer))
    config.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    # A placeholder is never a token to generate.
    language_model.generation_config.suppress_tokens = sorted(
        set(language_model.generation_config.suppress_tokens or []) | {config.image_token_id})
    language_model.requires_grad_(False)
    config.tokens_per_image = tower.tokens_per_image()
    projector = build_projector(config.projector, tower.hidden_size, language_model.config.hidden_size)
    projector.to(_torch_dtype(config.dtype)).load_state_dict(projector_state)
    model = VLM(config, tower, projector, language_model)
    if device is not None and not load_in_4bit:
        model.to(device)
    processor = VLMProcessor(tokenizer, load_image_processor(config.vision_tower), config.tokens_per_image,
                             config.image_token, None, config.image_aspect)
    return model, processor


def _from_stage1(root: Path, config: dict, settings: dict, base: ModelConfig | None, load_in_4bit: bool,
                 device: str | torch.device | None, dtype: str | None) -> tuple[VLM, VLMProcessor]:
    """A stage-1 projector on ``base``'s LM and tower; the projector's kind and features are the folder's."""
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
    path = root / STAGE1_FILE
    tensors = read_pickle(path)
    model, processor = build_vlm(model_config, None, load_in_4bit=load_in_4bit, device=device)
    mine = model.projector.state_dict()
    needed = {PROJECTOR_PREFIX + theirs: tuple(mine[ours].shape) for theirs, ours in PROJECTOR_NAMES[
        model_config.projector].items()}
    check_tensors({name: tuple(t.shape) for name, t in tensors.items()}, needed, path)
    model.projector.load_state_dict(_projector_state(model_config.projector, tensors))
    return model, processor
