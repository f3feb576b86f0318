"""Configs: YAML plus key=value overrides; unknown keys and bad values are refused."""

import re
from pathlib import Path

import pytest

from vlm.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["llava-1.5-7b.yaml", "qwen2.5-0.5b.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert config.model.vision_feature_layer == -2


def test_overrides_reach_nested_fields_with_types():
    config = load_config(CONFIGS / "tiny.yaml", ["train.lr=2e-4", "stage=instruct", "data.path=d.json",
                                                 "train.max_steps=3", "model.projector=merge2x2_mlp"])
    assert config.train.lr == pytest.approx(2e-4) and isinstance(config.train.lr, float)
    assert (config.stage, config.data.path, config.train.max_steps) == ("instruct", "d.json", 3)
    assert config.model.projector == "merge2x2_mlp"


@pytest.mark.parametrize(("override", "message"), [
    ("train.lrr=1", "unknown config key"), ("model.projector=conv", "projector='conv' is not one of"),
    ("stage=pretrain", "stage='pretrain'"), ("train.lr=fast", "is not a number"), ("oops", "key=value")])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


@pytest.mark.parametrize(("override", "message"), [
    ("seed=abc", "seed='abc' is not an integer"), ("train=5", "train must be a mapping"),
    ("train.max_steps=2.5", "train.max_steps=2.5 is not an integer"),
    ("train.group_by_length=maybe", "train.group_by_length='maybe' is not true or false"),
    ("train.mixed_precision=bf8", "train.mixed_precision='bf8' is not one of no, bf16, fp16"),
    ("train.lora_target=q_proj", "train.lora_target='q_proj' is not a list"),
    ("train.grad_accum=0", "train.grad_accum=0 must be at least 1"), ("data.template=[a]", "is not text"),
    ("train.lr=true", "train.lr=True is not a number"), ("train.lr.x=1", "train.lr is '1e-3', not a section")])
def test_wrong_types_are_named_before_anything_is_built(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(CONFIGS / "tiny.yaml", ["train.lr=1e-3", override])


def test_values_are_typed_by_the_dataclass_hints(tmp_path):
    config = load_config(CONFIGS / "tiny.yaml", ['data.max_length="512"', "train.group_by_length=no",
                                                 "train.gradient_checkpointing=On", "train.mixed_precision=no",
                                                 "train.max_steps=4.0", "resume=yes", "train.lora_target=[q_proj]"])
    assert config.data.max_length == 512 and isinstance(config.data.max_length, int)  # a numeric string: coerced
    assert config.train.group_by_length is False and config.train.gradient_checkpointing is True
    assert config.train.mixed_precision == "no" and config.train.max_steps == 4
    assert config.resume is True and config.train.lora_target == ["q_proj"]
    assert load_config(None, ["resume=runs/x/checkpoints/step_4"]).resume == "runs/x/checkpoints/step_4"
    # As written in a file: YAML 1.1 would read `no` as false.
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n  group_by_length: off\n  max_steps: '7'\n")
    config = load_config(tmp_path / "c.yaml")
    assert (config.train.mixed_precision, config.train.group_by_length, config.train.max_steps) == ("no", False, 7)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="pick one"):
        load_config(None, ["overwrite=true", "resume=true"])
    with pytest.raises(ValueError, match="cannot train a 4-bit LM"):
        load_config(None, ["train.full_finetune=true", "train.load_in_4bit=true"])


def test_a_config_that_is_a_folder_or_not_text_is_named(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.yaml is not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
