"""Configs: YAML plus key=value overrides; unknown keys and bad values are refused."""

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
