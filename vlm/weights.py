"""Weight files and the checks every loader shares: dtypes by name, complete safetensors, complete checkpoints.

The lowest layer of model loading: the model, the Llava readers and the loader all use it; it uses none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import BitsAndBytesConfig, PreTrainedModel

# What loading a model folder raises when the folder is broken: ModelFolderError is a ValueError, and
# safetensors' own error (no file name) where a loader lets it through.
LOAD_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, ValueError, OSError, SafetensorError)

class ModelFolderError(ValueError):
    """A model folder that cannot be loaded as it is (a file missing, truncated or short of tensors); one line."""


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, or one line saying the name is not a dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype (float32, bfloat16, float16)")
    return dtype


def four_bit(dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's quantization of an LM: NF4 linear layers computing in ``dtype``, lm_head kept in full precision.

    Only the LM is quantized: the tower and projector are separate modules here.
    """
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"])


def resolve_reference(root: Path | None, reference: str) -> str:
    """A component named relative to a saved folder lives inside it; anything else is a path or hub id."""
    if root is not None and (root / reference).exists():
        return str(root / reference)
    return reference


def make_room_for(language_model: PreTrainedModel, vocab_size: int) -> None:
    """Grow the LM's vocabulary to hold ``<image>``, deterministically.

    transformers samples new rows at random; a stage-1 checkpoint that re-adds the token on every
    load would then see a different ``<image>`` logit each time. The mean row is the same every time.
    """
    old_size = language_model.get_input_embeddings().num_embeddings
    if vocab_size <= old_size:
        return
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    matrices = {id(m.weight): m.weight for m in (language_model.get_input_embeddings(),
                                                 language_model.get_output_embeddings()) if m is not None}
    with torch.no_grad():
        for weight in matrices.values():
            weight[old_size:] = weight[:old_size].mean(0)


def check_weight_files(folder: str | Path) -> None:
    """Every safetensors file in ``folder`` (and below) opens: a truncated or empty one is named in one line."""
    for file in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelFolderError(f"{file} is not a complete safetensors file ({error})") from None


def weights_name(folder: str | Path) -> str:
    """The file a message about a checkpoint's tensors should name."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    return str(folder)


def load_complete(load: Callable, folder: str | Path, **kwargs):
    """``load(folder, **kwargs)`` (a ``from_pretrained``) that refuses weights the checkpoint lacks or mis-shapes.

    transformers would initialise those at random and log a table of them; this raises one line instead.
    """
    # transformers checks its tensor-parallel plan (and warns about it) whenever its logger has a level set.
    reports = [logging.getLogger(name) for name in ("transformers.modeling_utils",
                                                    "transformers.distributed.tensor_parallel")]
    levels = [report.level for report in reports]
    for report in reports:
        report.setLevel(logging.ERROR)
    try:
        model, info = load(folder, output_loading_info=True, **kwargs)
    finally:
        for report, level in zip(reports, levels, strict=True):
            report.setLevel(level)
    require_all_weights(info, folder)
    return model


def require_all_weights(info: dict, folder: str | Path) -> None:
    """transformers fills tensors a checkpoint lacks (or holds mis-shaped) with random values: refuse instead."""
    missing = sorted(info["missing_keys"])
    mismatched = sorted(f"{key} ({tuple(saved)} in the file, {tuple(wanted)} in the config)"
                        for key, saved, wanted in info["mismatched_keys"])
    problems = [f"{label} {some(names)}" for label, names in (("lacks", missing), ("mis-shaped", mismatched)) if names]
    if problems:
        raise ModelFolderError(f"{weights_name(folder)}: {'; '.join(problems)}")


def some(names: list[str], shown: int = 4) -> str:
    """The first ``shown`` names and how many more: a message about many tensors stays one short line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
