"""Dataclass configs, read from YAML with ``key=value`` overrides (``train.lr=1e-4``)."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECTORS = ("linear", "mlp2x_gelu", "merge2x2_mlp", "query_pool_mlp")
FEATURE_SELECTS = ("patch", "cls_patch")
IMAGE_ASPECTS = ("pad", "resize", "crop")


@dataclass
class ModelConfig:
    """What a VLM is made of. Saved as ``config.json`` beside the weights."""

    vision_tower: str = "openai/clip-vit-large-patch14-336"
    language_model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    projector: str = "mlp2x_gelu"
    projector_queries: int = 32  # query_pool_mlp: visual tokens per image
    vision_feature_layer: int = -2
    vision_feature_select: str = "patch"  # "patch" drops CLS (LLaVA-1.5), "cls_patch" keeps it
    image_size: int | None = None  # None: the tower's own resolution
    image_aspect: str = "pad"  # how a non-square image becomes square: pad | resize | crop
    image_token: str = "<image>"
    chat_template: str | None = None  # None: the tokenizer's own; else a name in vlm.data.templates or Jinja text
    dtype: str = "float32"
    # Filled in when a model is built; recorded so a saved folder describes itself.
    image_token_id: int | None = None
    tokens_per_image: int | None = None

    def __post_init__(self) -> None:
        _check_choice("projector", self.projector, PROJECTORS)
        _check_choice("vision_feature_select", self.vision_feature_select, FEATURE_SELECTS)
        _check_choice("image_aspect", self.image_aspect, IMAGE_ASPECTS)

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


@dataclass
class Config:
    """A whole experiment: the model, the data, the optimisation and the stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: str = "align"  # align: projector only | instruct: LoRA (or full) LM + projector
    init_from: str | None = None  # a saved model folder to start from (stage 2 starts from stage 1)
    resume: bool | str = False  # true: the latest checkpoint in output_dir; or a checkpoint path
    output_dir: str = "runs/default"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("stage", self.stage, ("align", "instruct"))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build a (nested) dataclass from a dict, refusing unknown keys so typos don't pass silently."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in sorted(unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}{key}.")
        kwargs[key] = _coerce(value, hint, where + key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """YAML reads ``1e-4`` as a string and ``3`` as an int where a float is wanted: fix those cases."""
    wants_float = hint is float or float in typing.get_args(hint)
    if wants_float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a number") from None
    return value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw != "" else None
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    return from_dict(cls, apply_overrides(values, overrides or []))
