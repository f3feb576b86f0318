"""Dataclass configs, read from YAML with ``key=value`` overrides (``train.lr=1e-4``)."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FEATURE_SELECTS = ("patch", "cls_patch", "pooled")
IMAGE_ASPECTS = ("pad", "resize", "crop")
MIXED_PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class ModelConfig:
    """What a VLM is made of. Saved as ``config.json`` beside the weights."""

    vision_tower: str | list[str] = "openai/clip-vit-large-patch14-336"  # a list: fused towers (DINOv2 + SigLIP)
    language_model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    projector: str = "mlp2x_gelu"  # a name in vlm.projector.PROJECTORS
    projector_queries: int = 32  # query_pool_mlp: visual tokens per image
    vision_feature_layer: int = -2
    vision_feature_select: str = "patch"  # "patch" drops CLS/registers (LLaVA-1.5), "cls_patch" keeps them, "pooled"
    image_size: int | None = None  # None: the tower's own resolution
    image_aspect: str = "pad"  # how a non-square image becomes square: pad | resize | crop
    image_token: str = "<image>"
    chat_template: str | None = None  # None: the tokenizer's own; else a name in vlm.chat_templates or Jinja text
    split_at_images: bool = True  # tokenize text between images apart (LLaVA); False: whole (HF LlavaProcessor)
    dtype: str = "float32"
    # Filled in when a model is built; recorded so a saved folder describes itself.
    image_token_id: int | None = None
    tokens_per_image: int | None = None
    adapter: bool = False  # a saved stage-2 result: its LoRA adapter (adapter/) belongs to it

    def __post_init__(self) -> None:
        # Imported here: the projector table holds torch modules, and importing vlm.config alone loads no torch.
        from vlm.projector import projector_kind

        projector_kind(self.projector)
        _check_choice("vision_feature_select", self.vision_feature_select, FEATURE_SELECTS)
        _check_choice("image_aspect", self.image_aspect, IMAGE_ASPECTS)
        if isinstance(self.vision_tower, list) and len(self.vision_tower) < 2:
            raise ValueError(f"vision_tower={self.vision_tower!r}: a list fuses two or more towers; name one as text")

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "vlm", **dataclasses.asdict(self)}, indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        values = json.loads(Path(path).read_text())
        values.pop("model_type", None)
        return from_dict(cls, values)


@dataclass
class DataConfig:
    """Where training samples come from and how they become token sequences."""

    path: str | None = None  # LLaVA JSON / JSONL, or a local datasets folder / json / parquet / arrow file
    image_folder: str = "."  # record image paths are relative to this
    image_column: str = "image"  # for Hugging Face datasets: paths, bytes or PIL images
    allow_outside_paths: bool = False  # let record image paths leave image_folder (absolute, ..)
    image_aspect: str | None = None  # training pictures only; None: the model's (LLaVA-1.5 stage 1: crop)
    template: str = "chat"  # plain (stage 1: image + caption) | chat (the model's chat template)
    max_length: int = 2048  # counts visual tokens
    on_too_long: str = "skip"  # skip (reported) | truncate (never inside an image, never to zero loss) | error
    max_bad_fraction: float = 0.0  # training refuses to start above this share of bad records
    cache_features: bool = False  # run the frozen tower once and read its features from disk after
    cache_dir: str | None = None  # where cached features live (None: <output_dir>/feature_cache); share it across runs
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check_choice("data.template", self.template, ("plain", "chat"))
        _check_choice("data.on_too_long", self.on_too_long, ("skip", "truncate", "error"))
        if self.image_aspect is not None:
            _check_choice("data.image_aspect", self.image_aspect, IMAGE_ASPECTS)


@dataclass
class TrainConfig:
    """The optimisation. Global batch = batch_size x grad_accum x processes."""

    lr: float = 1e-3
    projector_lr: float | None = None  # stage 2: the projector's own rate (LLaVA-1.5: 2e-5)
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # per device
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate)
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    save_every: int = 0  # steps between resumable checkpoints; 0: only at the end
    log_every: int = 1
    log_with: str | None = None  # e.g. tensorboard (Accelerate trackers)
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_target: list[str] | None = None  # None: every linear layer of the LM
    full_finetune: bool = False  # stage instruct: train all LM weights instead of LoRA
    load_in_4bit: bool = False  # QLoRA through bitsandbytes

    def __post_init__(self) -> None:
        _check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps} must be at least 1 (or unset: train.epochs counts)")
        if self.epochs <= 0 or self.save_every < 0:
            raise ValueError(f"train.epochs={self.epochs} must be above 0 and train.save_every={self.save_every} "
                             f"0 or more")
        if self.full_finetune and self.load_in_4bit:
            raise ValueError("train.full_finetune=true cannot train a 4-bit LM (train.load_in_4bit=true): drop one")


@dataclass
class Config:
    """A whole experiment: the model, the data, the optimisation and the stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: str = "align"  # align: projector only | instruct: LoRA (or full) LM + projector
    init_from: str | None = None  # a saved model folder to start from (stage 2 starts from stage 1)
    resume: bool | str = False  # true: the latest checkpoint in output_dir; or a checkpoint path
    overwrite: bool = False  # start afresh in an output_dir that holds another run's checkpoints (deletes them)
    output_dir: str = "runs/default"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("stage", self.stage, ("align", "instruct"))
        if self.overwrite and self.resume:
            raise ValueError(f"overwrite=true and resume={self.resume} contradict each other: pick one")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build a (nested) dataclass from a dict, refusing unknown keys and values of the wrong type by name."""
    if not isinstance(values, dict):
        raise ValueError(f"{where.rstrip('.') or 'the config'} must be a mapping of key: value, not {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in sorted(unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**{key: _coerce(value, hints[key], where + key) for key, value in values.items()})


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the type hint says, or a ValueError naming the key; a numeric string becomes a number."""
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, name + ".")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):  # in the order written: bool | str tries bool first
            try:
                return _coerce(value, option, name)
            except ValueError as error:
                errors.append(error)
        raise errors[0]
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ValueError(f"{name}={value!r} is not a list (write [a, b])")
        return [_coerce(item, typing.get_args(hint)[0], name) for item in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise ValueError(f"{name}={value!r} is not true or false")
    if hint is int:
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name}={value!r} is not an integer")
    if hint is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{name}={value!r} is not a number")
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # a folder named 2024
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}={value!r} is not text")
    return value


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads no/yes/on/off, so ``mixed_precision: no``
    arrived as False; a bool field still takes those words (see ``_coerce``)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node = values
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[:depth + 1])} is {node!r}, not a section")
        node[leaf] = _yaml(raw) if raw != "" else None
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        if Path(path).is_dir():
            raise ValueError(f"config file {path} is a folder, not a YAML file")
        try:
            values = _yaml(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"config file {path} is not UTF-8 text (byte {error.start})") from None
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must be a mapping of key: value, not {type(values).__name__}")
    return from_dict(cls, apply_overrides(values, overrides or []))
