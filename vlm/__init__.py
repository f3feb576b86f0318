"""vlm: a minimal LLaVA-style vision-language model.

``model, processor = vlm.load_pretrained(path_or_hub_id)``; ``model(**processor(images=..., text=...))``.
The names below load on first use, so that ``import vlm.config`` (a command checking its arguments) stays
free of torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# bitsandbytes (imported by peft) warns on every AVX512-BF16 CPU that an optional hub kernel is missing; its
# own fallback runs, so the line only adds noise to every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_HOMES = {"Config": "vlm.config", "ModelConfig": "vlm.config", "load_config": "vlm.config",
          "ModelFolderError": "vlm.loading", "build_vlm": "vlm.loading", "load_pretrained": "vlm.loading",
          "VLM": "vlm.model", "CallbackStreamer": "vlm.model", "VLMProcessor": "vlm.processor"}

__all__ = ["VLM", "CallbackStreamer", "Config", "ModelConfig", "ModelFolderError", "VLMProcessor", "build_vlm",
           "load_config", "load_pretrained"]

if TYPE_CHECKING:
    from vlm.config import Config, ModelConfig, load_config
    from vlm.loading import ModelFolderError, build_vlm, load_pretrained
    from vlm.model import VLM, CallbackStreamer
    from vlm.processor import VLMProcessor


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
