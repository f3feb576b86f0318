"""vlm: a minimal LLaVA-style vision-language model.

``model, processor = vlm.load_pretrained(path_or_hub_id)``; ``model(**processor(images=..., text=...))``.
"""

import logging

# bitsandbytes (imported by peft) warns on every AVX512-BF16 CPU that an optional hub kernel is missing; its
# own fallback runs, so the line only adds noise to every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from vlm.config import Config, ModelConfig, load_config
from vlm.loading import ModelFolderError, build_vlm, load_pretrained
from vlm.model import VLM, CallbackStreamer
from vlm.processor import VLMProcessor

__all__ = ["VLM", "CallbackStreamer", "Config", "ModelConfig", "ModelFolderError", "VLMProcessor", "build_vlm",
           "load_config", "load_pretrained"]
