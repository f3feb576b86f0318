"""Loading models: a project folder, a Hugging Face Llava folder, an original LLaVA folder or a hub id.

Callers import ``build_vlm``, ``load_pretrained`` and ``load_complete`` from here, above the model and the
format readers, so that the readers can use the model without importing each other back.
"""

from vlm.model import ModelFolderError, build_vlm, load_complete, load_pretrained

__all__ = ["ModelFolderError", "build_vlm", "load_complete", "load_pretrained"]
