"""The frozen vision tower: any Hugging Face vision encoder (or several, fused per patch), features from one layer."""

from __future__ import annotations

import inspect
import math

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
    # AutoModel maps a vision config (clip_vision_model, siglip_vision_model, dinov2, ...) to its vision model
    # class, and that class knows how to pick its weights out of a whole CLIP/SigLIP checkpoint.
    encoder_class = AutoModel._model_mapping[type(vision_config)]
    if output_loading_info:
        kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
    return encoder_class.from_pretrained(name_or_path, dtype=dtype, **kwargs)


def prefix_tokens_of(encoder: PreTrainedModel) -> int:
    """Tokens the encoder puts before its patches, read from its weights and config, never guessed.

    A class token (CLIP's ``class_embedding``, ViT's and DINOv2's ``cls_token``), DeiT's distillation token,
    and registers (``config.num_register_tokens``: Dinov2WithRegisters). SigLIP and SigLIP 2 have none.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in encoder.named_parameters()}
    tokens = sum(name in names for name in ("class_embedding", "cls_token", "distillation_token"))
    return tokens + int(getattr(encoder.config, "num_register_tokens", 0) or 0)


def _side(value: int | list | tuple) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class VisionTower(nn.Module):
    """Frozen encoder -> features ``[images, tokens, width]`` from ``feature_layer``.

    ``select``: ``patch`` (prefix tokens dropped, LLaVA-1.5), ``cls_patch`` (all kept) or ``pooled`` (the
    encoder's own pooled output, one token). A NaFlex encoder (SigLIP 2's, fed patches plus ``spatial_shapes``)
    gives a different number of tokens per image: a list of ``[tokens_i, width]`` instead.
    ``image_size``: the side its image processor produces (DINOv2's config says 518, its processor 224).
    """

    def __init__(self, encoder: PreTrainedModel, feature_layer: int = -2, select: str = "patch",
                 image_size: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.feature_layer = feature_layer
        self.select = select
        config = encoder.config
        self.patch_size: int = _side(config.patch_size)
        self.hidden_size: int = config.hidden_size
        parameters = inspect.signature(encoder.forward).parameters
        self.naflex: bool = "spatial_shapes" in parameters
        # An encoder that can resize its position embeddings reads images of any side.
        self.interpolates: bool = "interpolate_pos_encoding" in parameters
        # A NaFlex config has a patch budget instead of a side; its square is the fixed-resolution size.
        fixed = getattr(config, "image_size", None) or math.isqrt(config.num_patches) * self.patch_size
        self.native_image_size: int = image_size or _side(fixed)
        self.prefix_tokens: int = 0 if self.naflex else prefix_tokens_of(encoder)

    def train(self, mode: bool = True) -> VisionTower:
        # The tower never trains: keep it in eval mode (dropout off) whatever the caller does.
        super().train(False)
        return self

    @property
    def variable_tokens(self) -> bool:
        """Whether images of different shapes give different numbers of tokens (NaFlex patches)."""
        return self.naflex and self.select != "pooled"

    def tokens_per_image(self, image_size: int | None = None) -> int:
        """Tokens of a square image of ``image_size`` (NaFlex: its budget, the most an image can give)."""
        if self.select == "pooled":
            return 1
        if self.naflex:
            return self.encoder.config.num_patches
        grid = (image_size or self.native_image_size) // self.patch_size
        return grid * grid + (self.prefix_tokens if self.select == "cls_patch" else 0)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor,
                spatial_shapes: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        dtype = next(self.encoder.parameters()).dtype
        if self.naflex:
            if spatial_shapes is None:
                raise ValueError("a NaFlex tower (SigLIP 2) needs the spatial_shapes its image processor gives")
            lengths = spatial_shapes.prod(-1)
            # The processor pads each image's patches at the end: the first h*w are real.
            mask = torch.arange(pixel_values.shape[1], device=pixel_values.device)[None] < lengths[:, None]
            outputs = self.encoder(pixel_values.to(dtype), pixel_attention_mask=mask.long(),
                                   spatial_shapes=spatial_shapes, output_hidden_states=True)
        else:
            outputs = self.encoder(pixel_values.to(dtype), output_hidden_states=True,
                                   **({"interpolate_pos_encoding": True} if self.interpolates else {}))
        if self.select == "pooled":
            if getattr(outputs, "pooler_output", None) is None:
                raise ValueError(f"vision_feature_select=pooled: {type(self.encoder).__name__} has no pooled output "
                                 "(a SigLIP tower saved with vision_use_head=false?)")
            return outputs.pooler_output[:, None]
        features = outputs.hidden_states[self.feature_layer]
        if self.naflex:
            return [image[:length] for image, length in zip(features, lengths.tolist(), strict=True)]
        patches = (pixel_values.shape[-2] // self.patch_size) * (pixel_values.shape[-1] // self.patch_size)
        if features.shape[1] != patches + self.prefix_tokens:  # a tower whose extra tokens we do not know
            raise ValueError(f"{type(self.encoder).__name__} gave {features.shape[1]} tokens for {patches} patches "
                             f"and {self.prefix_tokens} known prefix token(s)")
        return features[:, self.prefix_tokens:] if self.select == "patch" else features


class _Encoders(nn.ModuleList):
    """The fused towers' encoders, with one ``config`` describing them all (the feature cache keys on it)."""

    @property
    def config(self) -> PretrainedConfig:
        return PretrainedConfig(towers=[encoder.config.to_dict() for encoder in self])


class FusedTower(nn.Module):
    """Several frozen towers at one patch grid, their patch features concatenated per patch (prismatic's
    DINOv2 + SigLIP), each from its own preprocessing.

    Pixels arrive as one tensor ``[images, 3 * towers, side, side]``: tower k's image in channels 3k..3k+2,
    at its own side in the top-left corner (see ``VLMProcessor.preprocess_images``), so batching and the
    feature cache treat them as any other pixels.
    """

    def __init__(self, towers: list[VisionTower], image_size: int | None = None) -> None:
        super().__init__()
        if any(tower.select != "patch" or tower.naflex for tower in towers):
            raise ValueError("fused vision towers need vision_feature_select=patch and fixed-resolution towers "
                             "(features are concatenated per patch)")
        self.towers = list(towers)  # their encoders are registered once, below
        self.encoder = _Encoders([tower.encoder for tower in towers])
        self.sides = [image_size or tower.native_image_size for tower in towers]
        grids = [side // tower.patch_size for side, tower in zip(self.sides, towers, strict=True)]
        if len(set(grids)) != 1:
            described = ", ".join(f"{side}px / patch {t.patch_size} = {grid}" for side, t, grid in
                                  zip(self.sides, towers, grids, strict=True))
            raise ValueError(f"fused vision towers must share one patch grid, got {described} "
                             "(set model.image_size, or pick towers of matching resolution)")
        self.feature_layer, self.select, self.naflex, self.variable_tokens = towers[0].feature_layer, "patch", False, False
        self.patch_size, self.prefix_tokens = towers[0].patch_size, 0
        self.native_image_size = self.sides[0]
        self.hidden_size = sum(tower.hidden_size for tower in towers)
        self._grid = grids[0]

    def train(self, mode: bool = True) -> FusedTower:
        super().train(False)
        return self

    def tokens_per_image(self, image_size: int | None = None) -> int:
        return self._grid * self._grid

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        if pixel_values.shape[1] != 3 * len(self.towers):
            raise ValueError(f"fused towers take {3 * len(self.towers)} pixel channels (3 per tower), got "
                             f"{pixel_values.shape[1]}: preprocess with the model's own VLMProcessor")
        features = [tower(pixel_values[:, 3 * k:3 * k + 3, :side, :side])
                    for k, (tower, side) in enumerate(zip(self.towers, self.sides, strict=True))]
        return torch.cat([f.to(features[0].dtype) for f in features], dim=-1)
