"""The image's text twin: one LM token per fact the tower is trained to read, in the projector's order.

The stand-in LM is pretrained and instruction-tuned with the twin where the image goes (``"BR-0131"``
then ``<FAULT on>``, ``<gauge 42>``, ``<dent>``...: one token per entry of ``SPOTS``), so it learns to
answer every question from those tokens, as a downloaded LLM answers from text. The projector is then
distilled, on the frozen tower's features, to put each fact's twin-token embedding at its visual
token (``distil_projector``): reading a panel becomes what the LM already does with its text.

Measured on the width-128 tower of one build (held-out panels): seeded from the glyph head through the
projector's GELU, only 23% of the code letters landed nearest their own glyph embedding, against 60%
read by the head itself; the LM copied the tag's print 100% from text but 0% once 15 untrained visual
tokens followed it. With a twin for every fact, the LM has seen every visual token's meaning in text.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlm.demo.contrastive import CODE_SLOTS, GLYPHS, IGNORE, SPOTS, fact_classes
from vlm.projector import QueryPoolProjector
from vlm.synth.panels import DAMAGE_TYPES, LAMP_LABELS

# The token of each class of each kind of fact; class numbers are the fact heads' (``spot_targets``).
# A lamp slot with no lamp (panels have 2-4) gets its own token.
FACT_TOKENS: dict[str, list[str]] = {
    "code": list(GLYPHS),  # the tokenizer's own single characters: the code is copied from them
    "lamp": [f"<{label} {state}>" for label in LAMP_LABELS for state in ("off", "on")] + ["<no lamp>"],
    "gauge": [f"<gauge {value}>" for value in range(101)],
    "warning": ["<no warning>", "<warning>"],
    "damage": ["<intact>"] + [f"<{kind}>" for kind in DAMAGE_TYPES],
}
NO_LAMP = len(FACT_TOKENS["lamp"]) - 1


def special_twin_tokens() -> list[str]:
    """The twin's tokens the tokenizer must add whole (the code's characters are ordinary tokens)."""
    return [token for kind, tokens in FACT_TOKENS.items() if kind != "code" for token in tokens]


def image_twin(report: dict) -> str:
    """The twin's text for one panel's report: its ``fact_classes`` as ``FACT_TOKENS``, no spaces."""
    classes = [NO_LAMP if cls == IGNORE else cls for cls in fact_classes(report)]
    return "".join(FACT_TOKENS[kind][cls] for (kind, _), cls in zip(SPOTS, classes, strict=True))


def twin_token_ids(tokenizer, targets: torch.Tensor) -> torch.Tensor:
    """``[panels, len(SPOTS), 2]`` targets (patch, class) -> the twin's token ids ``[panels, len(SPOTS)]``."""
    ids = {kind: torch.tensor(tokenizer.convert_tokens_to_ids(tokens)) for kind, tokens in FACT_TOKENS.items()}
    if any((t == tokenizer.unk_token_id).any() for t in ids.values()):
        raise ValueError("the tokenizer lacks some of the twin's tokens: train it with special_twin_tokens()")
    classes = targets[:, :, 1].clone()
    return torch.stack([ids[kind][torch.where(classes[:, i] == IGNORE, NO_LAMP, classes[:, i])]
                        for i, (kind, _) in enumerate(SPOTS)], 1)


def twin_vocabulary(tokenizer) -> torch.Tensor:
    """Every twin token id, the kinds in ``SPOTS`` order: what a visual token is told apart from."""
    return torch.tensor([i for tokens in FACT_TOKENS.values() for i in tokenizer.convert_tokens_to_ids(tokens)])


def distil_projector(projector: QueryPoolProjector, features: torch.Tensor, twin_ids: torch.Tensor,
                     embeddings: torch.Tensor, vocabulary: torch.Tensor, steps: int, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0) -> list[dict]:
    """Train the projector so visual token i is the LM's embedding of the panel's twin token i.

    ``features``: the frozen tower's patch tokens ``[panels, patches, width]`` (any float dtype);
    ``embeddings``: the LM's input embeddings. The loss is cross-entropy over the twin's vocabulary,
    scored against those embeddings (which token is this?), plus the squared distance to the
    target embedding relative to its size (and at the size the LM knows it).
    """
    generator = torch.Generator().manual_seed(seed)
    table = embeddings[vocabulary].detach()
    position = {int(t): i for i, t in enumerate(vocabulary)}
    labels = twin_ids.clone().apply_(lambda t: position[t])
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    history, started = [], time.perf_counter()
    projector.train()
    for step in (bar := tqdm(range(steps), desc="distil projector", unit="step")):
        index = torch.randint(len(features), (batch_size,), generator=generator)
        tokens, wanted = projector(features[index].to(table.dtype)), labels[index]
        which = F.cross_entropy((tokens @ table.T).flatten(0, 1), wanted.flatten())
        target = table[wanted]
        distance = ((tokens - target) ** 2).sum(-1).div(target.pow(2).sum(-1)).mean()
        (which + distance).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": which.item() + distance.item(), "which": which.item(),
                        "distance": distance.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    projector.eval()
    history[-1]["seconds"] = round(time.perf_counter() - started, 1)
    return history


@torch.no_grad()
def twin_accuracy(projector: QueryPoolProjector, features: torch.Tensor, twin_ids: torch.Tensor,
                  embeddings: torch.Tensor, vocabulary: torch.Tensor) -> dict[str, float]:
    """Share of visual tokens whose nearest twin-token embedding is the right one, per kind of fact
    (code letters, dash and digits apart), and whole codes."""
    tokens = projector(features.to(embeddings.dtype))
    table = embeddings[vocabulary]
    nearest = vocabulary[torch.cdist(tokens.flatten(0, 1), table).argmin(-1)].view_as(twin_ids)
    right = nearest == twin_ids
    groups: dict[str, list[int]] = {}
    for i, (kind, _) in enumerate(SPOTS):
        name = ("code_letter" if i < 2 else "code_dash" if i == 2 else "code_digit") if kind == "code" else kind
        groups.setdefault(name, []).append(i)
    result = {name: float(right[:, columns].float().mean()) for name, columns in groups.items()}
    result["code_exact"] = float(right[:, :len(CODE_SLOTS)].all(1).float().mean())
    return result
