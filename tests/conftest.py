import os
from pathlib import Path

import pytest

# Tests never reach the Hub: every model they use is built locally from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")




@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> dict[str, Path]:
    """Tiny towers and LMs built from configs, saved and read back like hub models."""
    from vlm.testing import tiny_lm, tiny_tower

    root = tmp_path_factory.mktemp("parts")
    return {
        "clip": tiny_tower(root / "clip", "clip"),
        "clip_full": tiny_tower(root / "clip_full", "clip", full_clip=True, seed=1),
        "siglip": tiny_tower(root / "siglip", "siglip"),
        "llama": tiny_lm(root / "llama", "llama"),
        "qwen2": tiny_lm(root / "qwen2", "qwen2", seed=1),
    }


@pytest.fixture(scope="session")
def tiny_model(parts):
    """A tiny CLIP + Llama VLM (mlp2x_gelu), random weights."""
    from vlm import ModelConfig, build_vlm

    return build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts["llama"])))
