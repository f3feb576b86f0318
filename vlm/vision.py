"""The frozen vision tower: any Hugging Face vision encoder, features from one hidden layer."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel


def vision_config_of(config: PretrainedConfig) -> PretrainedConfig:
    """CLIP and SigLIP hub checkpoints hold a text tower too; we want the vision half's config."""
    return getattr(config, "vision_config", None) or config


def load_vision_encoder(name_or_path: str, dtype: torch.dtype = torch.float32, output_loading_info: bool = False,
                        **kwargs) -> PreTrainedModel | tuple[PreTrainedModel, dict]:
    """Load only the vision encoder, from a vision-only folder or from a whole CLIP/SigLIP checkpoint.

    ``output_loading_info`` also returns transformers' missing/mismatched keys (mis-shaped tensors are then
    reported there instead of raising), so the caller can refuse weights the checkpoint lacks.
    """
    vision_config = vision_config_of(AutoConfig.from_pretrained(name_or_path, **kwargs))
    # AutoModel maps a vision config (clip_vision_model, siglip_vision_model, ...) to its vision model
    # class, and that class knows how to pick its weights out of a whole CLIP/SigLIP checkpoint.
    encoder_class = AutoModel._model_mapping[type(vision_config)]
    if output_loading_info:
        kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
    return encoder_class.from_pretrained(name_or_path, dtype=dtype, **kwargs)


class VisionTower(nn.Module):
    """Frozen encoder -> patch features ``[images, patches (+CLS), width]`` from ``feature_layer``."""

    def __init__(self, encoder: PreTrainedModel, feature_layer: int = -2, select: str = "patch") -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.feature_layer = feature_layer
        self.select = select
        vision_config = encoder.config
        self.patch_size: int = vision_config.patch_size
        self.native_image_size: int = vision_config.image_size
        self.hidden_size: int = vision_config.hidden_size
        # CLIP puts a CLS token before the patches; SigLIP has none. Its embedding table tells which.
        embeddings = next((m for m in encoder.modules() if hasattr(m, "num_positions") and hasattr(m, "num_patches")),
                          None)
        self.prefix_tokens: int = embeddings.num_positions - embeddings.num_patches if embeddings is not None else 0

    def train(self, mode: bool = True) -> VisionTower:
        # The tower never trains: keep it in eval mode (dropout off) whatever the caller does.
        super().train(False)
        return self

    def tokens_per_image(self, image_size: int | None = None) -> int:
        grid = (image_size or self.native_image_size) // self.patch_size
        keep_prefix = self.select == "cls_patch"
        return grid * grid + (self.prefix_tokens if keep_prefix else 0)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.encoder.parameters()).dtype
        outputs = self.encoder(pixel_values.to(dtype), output_hidden_states=True, interpolate_pos_encoding=True)
        features = outputs.hidden_states[self.feature_layer]
        if self.select == "patch":
            features = features[:, self.prefix_tokens:]
        return features
