"""An original haotian-liu/LLaVA folder's config and shards: what it is, its settings, its LM and projector tensors.

Apart from the rest of the LLaVA reader (vlm.llava_original) because the loader also reads the LM alone, for a
stage-2 result whose ``language_model`` names an original folder. Every tensor is checked by name and shape on
the meta device before any is read; pickled shards are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from vlm.config import FEATURE_SELECTS
from vlm.projector import PROJECTORS, build_projector
from vlm.weights import four_bit, some

log = logging.getLogger(__name__)

PROJECTOR_PREFIX = "model.mm_projector."
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


def llava_settings(config: dict, root: Path) -> dict:
    """The ModelConfig fields a LLaVA config decides, or one error naming what is not supported."""
    where = root / "config.json"
    if config.get("mm_use_im_start_end"):
        raise ValueError(f"{where}: mm_use_im_start_end=true (image start/end tokens) is not supported")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ValueError(f"{where}: mm_patch_merge_type={config['mm_patch_merge_type']!r} is not supported (only flat)")
    projector = config.get("mm_projector_type", "linear")  # LLaVA's own default
    readable = [name for name, kind in PROJECTORS.items() if kind.llava_names]
    if projector not in readable:
        raise ValueError(f"{where}: mm_projector_type={projector!r} is not supported (only {', '.join(readable)})")
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
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) the model needs: {some(missing, 5)}")
    misshapen = [name for name in needed if name in found and found[name] != needed[name]]
    if misshapen:
        name = misshapen[0]
        raise ValueError(f"{where}: tensor {name} has shape {list(found[name])} but the config needs "
                         f"{list(needed[name])} ({len(misshapen)} tensor(s) differ)")
    # Older transformers saved the rotary buffer, which is recomputed from the config.
    unused = [name for name in found if name not in needed and not name.endswith("rotary_emb.inv_freq")]
    if unused:
        log.warning("%s: %d tensor(s) not used: %s", where, len(unused), some(unused, 5))
    return [name for name in needed if name in found]


def projector_shapes(kind: str, vision_width: int, llm_width: int) -> dict[str, tuple[int, ...]]:
    """The projector's tensors under LLaVA's names, with their shapes (built on meta: nothing allocated)."""
    with torch.device("meta"):
        ours = build_projector(kind, vision_width, llm_width).state_dict()
    return {PROJECTOR_PREFIX + theirs: tuple(ours[mine].shape) for theirs, mine in PROJECTORS[kind].llava_names.items()}


def projector_state(kind: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {mine: tensors[PROJECTOR_PREFIX + theirs] for theirs, mine in PROJECTORS[kind].llava_names.items()}


def read_weights(root: Path, config: dict, projector: str, dtype: torch.dtype,
                 load_in_4bit: bool) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """The LM and the projector's tensors from the shards; every name and shape is checked before any is read."""
    lm_config = language_model_config(config, root)
    shards = Shards(weight_files(root))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(lm_config)
    needed = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    needed.update(projector_shapes(projector, config["mm_hidden_size"], lm_config.hidden_size))
    tied = {"lm_head.weight"} if lm_config.tie_word_embeddings else set()
    tensors = shards.tensors(check_tensors(shards.shapes, needed, root, optional=tied))
    lm_state = {name: tensor for name, tensor in tensors.items() if not name.startswith(PROJECTOR_PREFIX)}
    return load_language_model(lm_config, lm_state, dtype, load_in_4bit), projector_state(projector, tensors)


def original_language_model(path: str | Path, dtype: torch.dtype = torch.float32,
                            load_in_4bit: bool = False) -> PreTrainedModel:
    """The LM of an original LLaVA folder alone (for a saved config whose language_model names such a folder)."""
    root = Path(path)
    config = json.loads((root / "config.json").read_text())
    return read_weights(root, config, llava_settings(config, root)["projector"], dtype, load_in_4bit)[0]


def load_language_model(lm_config: LlamaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                        load_in_4bit: bool = False) -> PreTrainedModel:
    """The LM from a checked state dict (transformers builds it on meta and quantizes as it loads)."""
    quantization = four_bit(dtype) if load_in_4bit else None
    model_class = AutoModelForCausalLM._model_mapping[type(lm_config)]
    return model_class.from_pretrained(None, config=lm_config, state_dict=state, dtype=dtype,
                                       quantization_config=quantization)

