"""Projectors: vision features ``[images, tokens, vision_width]`` -> LLM embeddings ``[images, tokens', llm_width]``."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLPProjector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu``. Attribute names match Hugging Face Llava's, so export is a rename-free copy."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class Merge2x2Projector(nn.Module):
    """Concatenate each 2x2 block of neighbouring patches (pixel-unshuffle), then the MLP: 4x fewer tokens."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.mlp = MLPProjector(4 * in_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        images, tokens, width = features.shape
        grid = math.isqrt(tokens)
        if grid * grid != tokens or grid % 2:
            raise ValueError(f"merge2x2_mlp needs an even square patch grid, got {tokens} tokens "
                             "(use vision_feature_select=patch and an image size of an even number of patches)")
        blocks = features.view(images, grid // 2, 2, grid // 2, 2, width).permute(0, 1, 3, 2, 4, 5)
        return self.mlp(blocks.reshape(images, tokens // 4, 4 * width))


class QueryPoolProjector(nn.Module):
    """``queries`` learned queries each pool the patch tokens by a softmax over patches, then the MLP.

    Attention pooling as SigLIP's MAP head or Qwen-VL's resampler do it, cut to one head without key or
    value maps: a query's score of a patch is linear in the normalised token, and the normalised tokens
    are what is pooled, so linear classifiers trained beside the tower ("which patch shows X", "what
    does this patch show") can be loaded as the queries and the MLP's first layer as they are.
    Any number of patches becomes ``queries`` tokens in a fixed order: what the i-th query finds is
    always at the i-th visual token. A learned embedding per query (zero at first) is added to what it
    pools, as resamplers add position embeddings: queries that find the same patch can then write
    different tokens (the tens and the units of one gauge's reading).
    """

    def __init__(self, in_features: int, out_features: int, queries: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.scores = nn.Linear(in_features, queries)
        self.query_embeddings = nn.Parameter(torch.zeros(queries, in_features))
        self.mlp = MLPProjector(in_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        normed = self.norm(features)
        weights = self.scores(normed).softmax(dim=1)  # [images, patches, queries]
        return self.mlp(weights.transpose(1, 2) @ normed + self.query_embeddings.to(normed.dtype))


def build_projector(kind: str, vision_width: int, llm_width: int, queries: int = 32) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_width, llm_width)
    if kind == "mlp2x_gelu":
        return MLPProjector(vision_width, llm_width)
    if kind == "merge2x2_mlp":
        return Merge2x2Projector(vision_width, llm_width)
    if kind == "query_pool_mlp":
        return QueryPoolProjector(vision_width, llm_width, queries)
    raise ValueError(f"unknown projector {kind!r}; choose linear, mlp2x_gelu, merge2x2_mlp or query_pool_mlp")


def projected_tokens(kind: str, vision_tokens: int, queries: int = 32) -> int:
    if kind == "query_pool_mlp":
        return queries
    return vision_tokens // 4 if kind == "merge2x2_mlp" else vision_tokens
