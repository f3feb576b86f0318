"""Projectors: vision features ``[images, tokens, vision_width]`` -> LLM embeddings ``[images, tokens', llm_width]``.

``PROJECTORS`` at the end is the one table of them: a config names a kind there, and the model reads from
it how to build the kind, how many tokens it makes and what it needs of the tower.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class ProjectorKind:
    """What the rest of the model needs to know about one kind of projector, beside how to build it.

    ``build(vision_width, llm_width, queries)`` makes the module; ``tokens(vision_tokens, queries)`` is how many
    visual tokens it makes of a tower's ``vision_tokens``. ``even_square_grid``: it needs the patches as an even
    square grid (so never a NaFlex tower's free-shaped grid). ``fixed_tokens``: every image becomes the same
    number of tokens whatever the tower gives. ``llava_names``: LLaVA's tensor name -> ours, where original
    LLaVA checkpoints hold this kind (``mm_projector_type``).
    """

    build: Callable[[int, int, int], nn.Module]
    tokens: Callable[[int, int], int] = lambda vision_tokens, queries: vision_tokens
    even_square_grid: bool = False
    fixed_tokens: bool = False
    llava_names: dict[str, str] = field(default_factory=dict)


# The one table of projectors: a saved config.json names its kind here. A new kind is an entry (and its class).
PROJECTORS: dict[str, ProjectorKind] = {
    "linear": ProjectorKind(lambda vision, llm, queries: nn.Linear(vision, llm),
                            llava_names={"weight": "weight", "bias": "bias"}),
    "mlp2x_gelu": ProjectorKind(lambda vision, llm, queries: MLPProjector(vision, llm),
                                llava_names={"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                                             "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}),
    "merge2x2_mlp": ProjectorKind(lambda vision, llm, queries: Merge2x2Projector(vision, llm),
                                  tokens=lambda vision_tokens, queries: vision_tokens // 4, even_square_grid=True),
    "query_pool_mlp": ProjectorKind(lambda vision, llm, queries: QueryPoolProjector(vision, llm, queries),
                                    tokens=lambda vision_tokens, queries: queries, fixed_tokens=True),
}


def projector_kind(name: str) -> ProjectorKind:
    """The table's entry for ``name``, or the config's one-line error naming the known kinds."""
    if name not in PROJECTORS:
        raise ValueError(f"projector={name!r} is not one of {', '.join(PROJECTORS)}")
    return PROJECTORS[name]


def build_projector(name: str, vision_width: int, llm_width: int, queries: int = 32) -> nn.Module:
    return projector_kind(name).build(vision_width, llm_width, queries)


def projected_tokens(name: str, vision_tokens: int, queries: int = 32) -> int:
    """Visual tokens per image that projector ``name`` makes of a tower's ``vision_tokens``."""
    return projector_kind(name).tokens(vision_tokens, queries)
