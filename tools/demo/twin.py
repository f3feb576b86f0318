"""The image's text twin: LM tokens for the facts the tower is trained to read, in the projector's order.

The stand-in LM is pretrained and instruction-tuned with the twin where the image goes (``"BR-0131"``
then ``<FAULT on>``, ``042`` for the gauge, ``<top-left dent>``...: a token per fact of ``SPOTS``, three
for the gauge), so it learns to answer every question from those tokens, as a downloaded LLM answers
from text. The projector is then distilled, on the frozen tower's features, to put each fact's
twin-token embedding at its visual token (``distil_projector``): reading a panel becomes what the LM
already does with its text.

Why a twin: a projector seeded from the fact heads lost much of what the heads read, and an LM that
copied the tag's print from text copied none of it once untrained visual tokens followed it. With a
twin for every fact, the LM has seen every visual token's meaning in text (docs/demo-model.md).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tools.demo.contrastive import CODE_SLOTS, GLYPHS, IGNORE, SPOTS, fact_classes
from vlm.inspection import DAMAGE_TYPES, LAMP_LABELS, LOCATIONS
from vlm.projector import QueryPoolProjector

# The words each cell's damage token stands for, in the damage tokens' order.
DAMAGE_WORDS: list[tuple[str, str]] = [(location, state) for location in LOCATIONS for state in ("intact", *DAMAGE_TYPES)]
# The token of each class of each kind of fact; class numbers are the fact heads' (``spot_targets``).
# A lamp slot with no lamp (panels have 2-4) gets its own token.
FACT_TOKENS: dict[str, list[str]] = {
    "code": list(GLYPHS),  # the tokenizer's own single characters: the code is copied from them
    "lamp": [f"<{label} {state}>" for label in LAMP_LABELS for state in ("off", "on")] + ["<no lamp>"],
    "warning": ["<no warning>", "<warning>"],
    # One token per cell and state ("<top-left dent>"), as a lamp's token carries its label: from
    # "<intact>"/"<dent>" in grid order the LM had to count to the asked cell and often named the wrong type.
    "damage": [f"<{location} {state}>" for location, state in DAMAGE_WORDS],
}
DAMAGE_STATES = 1 + len(DAMAGE_TYPES)
VOCABULARY: list[str] = [token for tokens in FACT_TOKENS.values() for token in tokens]  # ``twin_vocabulary``'s order
NO_LAMP = len(FACT_TOKENS["lamp"]) - 1
# The gauge reading is written as three ordinary digits ("042"), copied as the code's digits are: as one
# token of 101 (``<gauge 42>``) the LM, even from the exact twin, mostly got the tens wrong.
GAUGE_DIGITS = 3
# Distillation weighs a damaged cell by 1/frequency, the other facts' rare values (the code's excepted) by
# 1/sqrt(frequency): with 1/sqrt the distilled tokens showed far fewer damaged cells than the tower's head saw.
DAMAGE_RARITY_POWER = 1.0
# The fact (entry of ``SPOTS``) each twin token reads: the projector's query i is seeded from the where
# head's row ``TWIN_SPOTS[i]`` and distilled to twin token i.
TWIN_SPOTS: list[int] = [i for i, (kind, _) in enumerate(SPOTS) for _ in range(GAUGE_DIGITS if kind == "gauge" else 1)]
TWIN_KINDS: list[str] = [SPOTS[i][0] for i in TWIN_SPOTS]


def special_twin_tokens() -> list[str]:
    """The twin's tokens the tokenizer must add whole (the code's characters are ordinary tokens)."""
    return [token for kind, tokens in FACT_TOKENS.items() if kind != "code" for token in tokens]


def twin_tokens(classes: list[int]) -> list[str]:
    """The twin of one panel's ``fact_classes``, token by token (``IGNORE``: a lamp slot with no lamp)."""
    tokens, cell = [], 0
    for (kind, _), cls in zip(SPOTS, classes, strict=True):
        if kind == "gauge":
            tokens += list(f"{cls:0{GAUGE_DIGITS}d}")
        elif kind == "damage":  # the damage entries of SPOTS are the cells in LOCATIONS order
            tokens.append(FACT_TOKENS[kind][cell * DAMAGE_STATES + cls])
            cell += 1
        else:
            tokens.append(FACT_TOKENS[kind][NO_LAMP if cls == IGNORE else cls])
    return tokens


def image_twin(report: dict) -> str:
    """The twin's text for one panel's report, no spaces."""
    return "".join(twin_tokens(fact_classes(report)))


def twin_token_ids(tokenizer, targets: torch.Tensor) -> torch.Tensor:
    """``[panels, len(SPOTS), 2]`` targets (patch, class) -> the twin's token ids ``[panels, len(TWIN_SPOTS)]``."""
    ids = dict(zip(VOCABULARY, tokenizer.convert_tokens_to_ids(VOCABULARY), strict=True))
    if tokenizer.unk_token_id in ids.values():
        raise ValueError("the tokenizer lacks some of the twin's tokens: train it with special_twin_tokens()")
    return torch.tensor([[ids[token] for token in twin_tokens(classes)] for classes in targets[:, :, 1].tolist()])


def twin_vocabulary(tokenizer) -> torch.Tensor:
    """Every twin token id (the gauge's digits are among the code's glyphs): what a visual token is told
    apart from."""
    return torch.tensor(tokenizer.convert_tokens_to_ids(VOCABULARY))


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
    # The code's characters are uniform by design (power 0: nothing to rebalance).
    powers = {"code": 0.0, "damage": DAMAGE_RARITY_POWER}
    weights = rarity_weights(labels, torch.tensor([powers.get(kind, 0.5) for kind in TWIN_KINDS]))
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    history, started = [], time.perf_counter()
    projector.train()
    for step in (bar := tqdm(range(steps), desc="distil projector", unit="step")):
        index = torch.randint(len(features), (batch_size,), generator=generator)
        tokens, wanted = projector(features[index].to(table.dtype)), labels[index]
        which = (F.cross_entropy((tokens @ table.T).flatten(0, 1), wanted.flatten(), reduction="none")
                 * weights[index].flatten()).mean()
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


def rarity_weights(labels: torch.Tensor, powers: torch.Tensor | float = 0.5, cap: float = 10.0) -> torch.Tensor:
    """Per ``[panel, token]``, 1/frequency**power of the value that token takes (``powers``: one per token,
    or one for all), scaled to mean 1 at each token and capped: a cell showing one kind of damage (a few
    cells in a hundred) then weighs several times an intact one (nine in ten) instead of being outvoted by
    it, which would otherwise teach distillation the tower's own lean towards "intact".
    """
    powers = torch.as_tensor(powers, dtype=torch.float).expand(labels.shape[1])
    weights = torch.empty(labels.shape)
    for column in range(labels.shape[1]):
        _, inverse, counts = labels[:, column].unique(return_inverse=True, return_counts=True)
        raw = counts.float().pow(-powers[column])[inverse]
        weights[:, column] = (raw / raw.mean()).clamp(max=cap)
    return weights


@torch.no_grad()
def twin_accuracy(projector: QueryPoolProjector, features: torch.Tensor, twin_ids: torch.Tensor,
                  embeddings: torch.Tensor, vocabulary: torch.Tensor) -> dict[str, float]:
    """Share of visual tokens whose nearest twin-token embedding is the right one, per kind of fact
    (code letters, dash and digits apart); whole codes; the gauge's three digits as a reading, exact
    and within +/-5; ``damage_recall``: share of damaged cells whose token is nearest some damage."""
    tokens = projector(features.to(embeddings.dtype))
    table = embeddings[vocabulary]
    nearest = vocabulary[torch.cdist(tokens.flatten(0, 1), table).argmin(-1)].view_as(twin_ids)
    right = nearest == twin_ids
    groups: dict[str, list[int]] = {}
    for i, kind in enumerate(TWIN_KINDS):
        name = ("code_letter" if i < 2 else "code_dash" if i == 2 else "code_digit") if kind == "code" else kind
        groups.setdefault("gauge_digit" if kind == "gauge" else name, []).append(i)
    result = {name: float(right[:, columns].float().mean()) for name, columns in groups.items()}
    result["code_exact"] = float(right[:, :len(CODE_SLOTS)].all(1).float().mean())
    # Nine cells in ten are intact: of the damaged ones, how many come out as some damage at all.
    intact = vocabulary[[VOCABULARY.index(token) for (_, state), token in zip(DAMAGE_WORDS, FACT_TOKENS["damage"],
                                                                              strict=True) if state == "intact"]]
    cells = nearest[:, groups["damage"]], twin_ids[:, groups["damage"]]
    damaged = ~torch.isin(cells[1], intact)
    result["damage_recall"] = float((~torch.isin(cells[0], intact))[damaged].float().mean())
    # The vocabulary starts with the code's glyphs, the digits among them.
    digit_value = {int(vocabulary[GLYPHS.index(d)]): int(d) for d in "0123456789"}

    def reading(ids: torch.Tensor) -> torch.Tensor:  # -1000 where a token is not a digit
        return torch.tensor([int("".join(str(digit_value[i]) for i in row)) if all(i in digit_value for i in row)
                             else -1000 for row in ids[:, groups["gauge_digit"]].tolist()])
    read, truth = reading(nearest), reading(twin_ids)
    result["gauge_exact"] = float((read == truth).float().mean())
    result["gauge_within_5"] = float(((read - truth).abs() <= 5).float().mean())
    return result
