"""A small CLIP tower trained on image-caption pairs, with the CLIP softmax loss or the SigLIP sigmoid loss.

Both losses compare every image of a batch with every caption of it. On the panels, telling the
captions of one batch apart needs only a few coarse facts (the gauge alone often does), so the
contrastive loss by itself leaves the small print unread. Each training step therefore adds a
caption-fact loss on the patch tokens the VLM reads: the facts the caption states (asset code
characters, lamp states, gauge, damage per cell, warning label) are predicted from the token of the
patch where the renderer drew each one (``vlm.synth`` records that layout), as dense objectives
beside the contrastive one do in CoCa or LocCa, and a where head learns to point at the patch of each
fact. The where head becomes the queries of the demo's projector (``seed_query_projector``); the
other heads are saved beside the tower as a record of what it reads.

Each fact is read at its own patch because such a readout is local and the same everywhere in the
image, which a small ViT trained from scratch can learn; pooled readouts (learned-query attention, one
linear map over the token grid) left the code unread (docs/demo-model.md).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlm.inspection import CODE_LETTERS, DAMAGE_TYPES, LAMP_LABELS, LOCATIONS, NOUN
from vlm.projector import QueryPoolProjector

DIGITS = "0123456789"
GLYPHS = CODE_LETTERS + DIGITS + "-"  # the characters an asset code is printed in
CODE_SLOTS = tuple(range(7))  # every character of "AB-1234", the dash too: the LM copies the print as it is
MAX_LAMPS = 4
# One entry per fact: (head, classes). Facts of one kind share a head: a glyph looks the same in every
# slot of the code, so one classifier reads all seven characters (the dash too) and sees every slot's examples.
SPOTS = ([("code", len(GLYPHS))] * len(CODE_SLOTS) + [("lamp", 2 * len(LAMP_LABELS))] * MAX_LAMPS
         + [("gauge", 101), ("warning", 2)] + [("damage", 1 + len(DAMAGE_TYPES))] * len(LOCATIONS))
HEADS = dict(SPOTS)
CODE_WEIGHT = 2.0  # the code needs all seven characters right: its reading weighs double among the facts
# The code's letters weigh this much more than its digits: a code has two letter slots of 23 glyphs against
# four of 10 digits, so each letter is seen about a fifth as often and, unweighted, lags the digits.
LETTER_WEIGHT = 3.0
GAUGE_SIGMA = 1.5  # gauge targets are soft: 42 vs 43 is a near miss, not a wrong class
# The projector pools with the where head's scores times this: the softmax then sits on the fact's own
# patch instead of spreading over its neighbours (a code character's neighbours are other characters).
POOL_SHARPNESS = 4.0
IGNORE = -100
# Nine cells in ten are intact, so unweighted the damage head calls many damaged cells intact (dents most):
# a damaged class weighs this much more.
DAMAGE_CLASS_WEIGHTS = torch.tensor([1.0] + [3.0] * len(DAMAGE_TYPES))


def fact_classes(report: dict) -> list[int]:
    """The class of every entry of ``SPOTS`` for one panel's report; ``IGNORE`` where a lamp is absent."""
    classes = [GLYPHS.index(report["asset_code"][i]) for i in CODE_SLOTS]
    lamps = report["lamps"]
    classes += [2 * LAMP_LABELS.index(lamps[k]["label"]) + int(lamps[k]["on"]) if k < len(lamps) else IGNORE
                for k in range(MAX_LAMPS)]
    classes += [report["gauge_reading"], int(report["warning_label"])]
    damage = {item["location"]: 1 + DAMAGE_TYPES.index(item["type"]) for item in report["damage"]}
    return classes + [damage.get(location, 0) for location in LOCATIONS]


def spot_targets(report: dict, layout: dict, pixels_per_patch: float, grid: int) -> list[tuple[int, int]]:
    """(patch index, class) of every entry of ``SPOTS`` for one panel (``fact_classes``); patch 0 where a
    lamp is absent.

    ``layout`` holds image-pixel points (vlm.synth's ``camera["layout"]``); ``pixels_per_patch`` is the
    patch size in those pixels.
    """
    def patch(point: list[float]) -> int:
        col, row = (min(grid - 1, max(0, int(v // pixels_per_patch))) for v in point)
        return row * grid + col

    points = ([layout["code"][i] for i in CODE_SLOTS] + [layout["lamps"][k] if k < len(layout["lamps"]) else None
                                                        for k in range(MAX_LAMPS)]
              + [layout["gauge"][0], layout["warning"][0]] + list(layout["cells"]))
    return [(0 if point is None else patch(point), cls)
            for point, cls in zip(points, fact_classes(report), strict=True)]


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP: softmax cross-entropy over the batch, image->text and text->image, averaged."""
    logits = logit_scale.exp() * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP: an independent binary decision per (image, caption) pair, +1 on the diagonal, -1 elsewhere.

    Summed over captions and averaged over images, as in Zhai et al. (2023).
    """
    logits = logit_scale.exp() * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T + logit_bias
    signs = 2 * torch.eye(len(logits), device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


class SpotHeads(nn.Module):
    """Each fact is read from the token of its own patch by a linear classifier of its kind; a "where"
    head scores every patch for every fact, trained as a softmax over the patches pointing at the one
    where the fact is drawn.

    The where head makes each fact findable by content, wherever the camera put it: it is exactly the
    attention pooling of ``QueryPoolProjector``, which starts from it (``seed_query_projector``). The
    code head is also trained on what that pooling yields, and to stay below zero on the other facts'
    patches.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(width)  # the residual stream is not normalised at the last layer
        self.classifiers = nn.ModuleDict({name: nn.Linear(width, classes) for name, classes in HEADS.items()})
        self.where = nn.Linear(width, len(SPOTS))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """One logits tensor per entry of ``SPOTS``; the code head on every other fact's patch
        ``[images, facts - 7, glyphs]``; the code head on what the seeded projector's code queries pool
        ``[images, 7, glyphs]``; the where scores ``[images, patches, len(SPOTS)]``."""
        rows = torch.arange(len(tokens), device=tokens.device)
        tokens = self.token_norm(tokens)
        facts = [self.classifiers[name](tokens[rows, targets[:, i, 0]]) for i, (name, _) in enumerate(SPOTS)]
        elsewhere = self.classifiers["code"](tokens[rows[:, None], targets[:, len(CODE_SLOTS):, 0]])
        where = self.where(tokens)
        return facts + [elsewhere, self.read_pooled_code(tokens, where), where]

    def read_pooled_code(self, normed: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """The code head on the normalised tokens pooled as the seeded projector pools them."""
        weights = (POOL_SHARPNESS * where[:, :, :len(CODE_SLOTS)]).softmax(1)
        return self.classifiers["code"](weights.transpose(1, 2) @ normed)


def where_loss(where: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per present fact, cross-entropy of the softmax over patches against the fact's patch, in units of
    chance (log of the patch count)."""
    present = targets[:, :, 1] != IGNORE
    scores = where.transpose(1, 2)[present]  # [present facts, patches]
    return F.cross_entropy(scores, targets[:, :, 0][present]) / math.log(where.shape[1])


def glyph_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The code head's loss: softmax cross-entropy (with it the head learns to read sooner) plus
    one-vs-rest cross-entropy summed over glyphs, which pins the logits' level (above zero for the glyph
    shown, below for the rest), each in units of chance; ``labels`` None: no glyph is there, every logit
    belongs below zero."""
    classes = logits.shape[-1]
    wanted = torch.zeros_like(logits) if labels is None else F.one_hot(labels, classes).to(logits.dtype)
    one_vs_rest = F.binary_cross_entropy_with_logits(logits, wanted, reduction="none").sum(-1).mean()
    loss = one_vs_rest / (math.log(classes) + 1)  # a glyph prior of 1/K costs about log K + 1
    return loss if labels is None else loss + F.cross_entropy(logits, labels) / math.log(classes)


def field_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Weighted mean over facts of each one's loss in units of its chance level (log of its class count),
    so the 101-way gauge does not drown the 2-way warning label; plus the where head's ``where_loss``."""
    *logits, elsewhere, pooled, where = logits
    losses, weights = [], []
    for i, ((name, classes), spot_logits) in enumerate(zip(SPOTS, logits, strict=True)):
        labels = targets[:, i, 1]
        present = labels != IGNORE
        if not present.any():
            continue
        if name == "code":  # read at the character's own patch, and from what the projector will pool
            losses += [glyph_loss(spot_logits, labels), glyph_loss(pooled[:, i], labels)]
            weights += [CODE_WEIGHT / 2 * (LETTER_WEIGHT if i < 2 else 1.0)] * 2
            continue
        if name == "gauge":
            values = torch.arange(classes, dtype=spot_logits.dtype, device=spot_logits.device)
            soft = torch.softmax(-((values[None] - labels[:, None]) ** 2) / (2 * GAUGE_SIGMA ** 2), -1)
            losses.append(-(soft * spot_logits.log_softmax(-1)).sum(-1).mean() / math.log(classes))
        else:
            class_weights = DAMAGE_CLASS_WEIGHTS.to(spot_logits) if name == "damage" else None
            losses.append(F.cross_entropy(spot_logits, labels, weight=class_weights, ignore_index=IGNORE)
                          / math.log(classes))
        weights.append(1.0)
    other_present = targets[:, len(CODE_SLOTS):, 1] != IGNORE
    losses.append(glyph_loss(elsewhere[other_present], None))
    weights.append(1.0)
    weights_t = torch.tensor(weights, dtype=where.dtype, device=where.device)
    # Pointing weighs as much as all the reading: as one term among the facts' its softmax stayed spread
    # far beyond a code character's patch, and the projector's tokens pool what it points at.
    return (torch.stack(losses) * weights_t).sum() / weights_t.sum() + where_loss(where, targets)


def field_accuracy(logits: list[torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy per kind of fact (code letters and digits apart); the asset code also as an exact
    match of all seven characters; ``code_false_glyph``: share of the other facts' patches where some glyph
    logit is above zero; ``where``: the where head's best patch is the fact's own or touches it (a glyph
    or a cell centre on a patch border is drawn in both), over every present fact; ``damage_recall``: share
    of damaged cells read as damaged (of any type); ``code_pooled`` and
    ``code_pooled_exact``: the code read from the tokens the seeded projector pools."""
    *logits, elsewhere, pooled, where = logits
    present = targets[:, :, 1] != IGNORE
    grid = math.isqrt(where.shape[1])
    best, truth = where.argmax(1), targets[:, :, 0]
    near = torch.maximum((best // grid - truth // grid).abs(), (best % grid - truth % grid).abs()) <= 1
    hits: dict[str, list[torch.Tensor]] = {"where": [near[present]]}
    code_hits = []
    for i, ((name, _), spot_logits) in enumerate(zip(SPOTS, logits, strict=True)):
        labels, predicted = targets[:, i, 1], spot_logits.argmax(-1)
        hit = (predicted - labels).abs() <= 5 if name == "gauge" else predicted == labels
        if name == "code":
            name = "code_letter" if i < 2 else "code_dash" if i == 2 else "code_digit"
            code_hits.append(hit)
        hits.setdefault(name, []).append(hit[labels != IGNORE])
        if name == "damage":  # most cells are intact: how many damaged ones are seen at all
            hits.setdefault("damage_recall", []).append(predicted[labels > 0] > 0)
    result = {kind: float(torch.cat(h).float().mean()) for kind, h in hits.items()}
    result["code_exact"] = float(torch.stack(code_hits).all(0).float().mean())
    other_present = targets[:, len(CODE_SLOTS):, 1] != IGNORE
    result["code_false_glyph"] = float((elsewhere[other_present].max(-1).values > 0).float().mean())
    pooled_hits = pooled.argmax(-1) == targets[:, :len(CODE_SLOTS), 1]
    result["code_pooled"] = float(pooled_hits.float().mean())
    result["code_pooled_exact"] = float(pooled_hits.all(1).float().mean())
    return result


@dataclass
class TowerSpec:
    image_size: int = 160
    patch_size: int = 16
    width: int = 192
    layers: int = 6
    text_width: int = 192
    text_layers: int = 3
    embed_dim: int = 128
    head_width: int = 32  # the vision tower's attention heads: width // head_width of them
    activation: str = "quick_gelu"


def build_clip(spec: TowerSpec, vocab_size: int, eos_token_id: int, pad_token_id: int) -> CLIPModel:
    vision = dict(hidden_size=spec.width, intermediate_size=4 * spec.width, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.width // spec.head_width, hidden_act=spec.activation,
                  image_size=spec.image_size, patch_size=spec.patch_size)
    text = dict(hidden_size=spec.text_width, intermediate_size=4 * spec.text_width, num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_width // 32, vocab_size=vocab_size, max_position_embeddings=128,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=eos_token_id)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.embed_dim))
    zero_residual_branches(model.vision_model)
    return model


def zero_residual_branches(vision_model: nn.Module) -> None:
    """Start every attention and MLP branch at zero, so the tower begins as its patch embedding.

    The field heads can then read pixel features from the first step while the layers learn what to
    add (skip-init, as LayerScale or Fixup do): from the default init a tower this size sits at chance
    on every field for a long stretch before it starts to learn.
    """
    with torch.no_grad():
        for layer in vision_model.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()


@torch.no_grad()
def seed_query_projector(projector: QueryPoolProjector, heads: SpotHeads, spots: list[int]) -> None:
    """Start a ``query_pool_mlp`` projector's pooling from the where head the tower's training taught.

    Query i is the where head's score "fact ``spots[i]`` (an entry of ``SPOTS``) is drawn in this patch",
    sharpened by ``POOL_SHARPNESS``, so visual token i starts as the patch showing that fact, wherever
    the camera put it; the norm is the heads' own, so the pooled tokens are what the code head was also
    trained to read (``read_pooled_code``). ``tools.demo.twin.distil_projector`` trains the rest.
    """
    if projector.scores.out_features != len(spots):
        raise ValueError(f"the projector has {projector.scores.out_features} queries; seeding it needs one per "
                         f"twin token ({len(spots)})")
    projector.norm.load_state_dict(heads.token_norm.state_dict())
    projector.scores.weight.copy_(POOL_SHARPNESS * heads.where.weight[spots])
    projector.scores.bias.copy_(POOL_SHARPNESS * heads.where.bias[spots])


def image_processor(spec: TowerSpec) -> CLIPImageProcessorPil:
    size = spec.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


class Contrastive(nn.Module):
    """CLIPModel + the bias SigLIP adds to its logits + the caption-field heads."""

    def __init__(self, clip: CLIPModel, loss: str, contrastive_weight: float = 1.0) -> None:
        super().__init__()
        self.clip, self.loss, self.contrastive_weight = clip, loss, contrastive_weight
        self.heads = SpotHeads(clip.config.vision_config.hidden_size)
        if loss == "siglip":  # the paper's initialisation: t' = log 10, b = -10
            with torch.no_grad():
                clip.logit_scale.fill_(math.log(10))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        vision = self.clip.vision_model(pixel_values=pixel_values)
        fields = field_loss(self.heads(vision.last_hidden_state[:, 1:], targets), targets)
        if self.loss == "none":
            return fields, {"fields": fields.item()}
        image_embeds = self.clip.visual_projection(vision.pooler_output)
        text_embeds = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        if self.loss == "clip":
            contrast = clip_loss(image_embeds, text_embeds, self.clip.logit_scale)
        else:
            contrast = siglip_loss(image_embeds, text_embeds, self.clip.logit_scale, self.logit_bias)
        return self.contrastive_weight * contrast + fields, {"contrastive": contrast.item(), "fields": fields.item()}


def tokenize_captions(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """Captions end in eos: CLIP's text tower pools the hidden state at the first eos."""
    return tokenizer([c + tokenizer.eos_token for c in captions], padding=True, return_tensors="pt",
                     add_special_tokens=False)


def train_tower(pixels: torch.Tensor, captions: list[str], targets: torch.Tensor, tokenizer, spec: TowerSpec,
                loss: str = "clip", steps: int = 400, max_seconds: float | Callable[[], float | None] | None = None,
                batch_size: int = 64,
                lr: float = 1e-3, seed: int = 0, desc: str = "tower",
                held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                eval_every: int = 250, before_step: Callable[[], None] | None = None,
                contrastive_weight: float = 1.0) -> tuple[Contrastive, list[dict]]:
    """Train from random weights; ``max_seconds`` stops early on a wall-time budget (the CPU is shared).
    It may be a function, asked again every step: the recipe learns how much time is left as it goes.

    With ``held_out`` (pixels, targets), field accuracy on them is logged every ``eval_every`` steps.
    ``before_step`` runs in this thread before every step (the recipe takes more threads there when
    the jobs beside the tower finish).
    """
    torch.manual_seed(seed)
    if tokenizer is None:  # field heads alone (the resolution probe): any text tower will do, it is unused
        clip = build_clip(spec, 16, 1, 0)
    else:
        tokenizer.padding_side = "right"
        clip = build_clip(spec, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = Contrastive(clip, loss, contrastive_weight)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    warmup, started = min(50, max(1, steps // 20)), time.perf_counter()

    def seconds_allowed() -> float | None:
        return max_seconds() if callable(max_seconds) else max_seconds

    def progress(step: int) -> float:  # on a time budget, the cosine follows the clock
        done, allowed = step / steps, seconds_allowed()
        return max(done, (time.perf_counter() - started) / allowed) if allowed else done

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                                 (1 + math.cos(math.pi * min(progress(s), 1.0))))
    order, rng, history = [], random.Random(seed), []
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, unit="step")):
        if len(order) < batch_size:  # epochs of a fresh permutation, so each batch holds distinct panels
            order += rng.sample(range(len(pixels)), len(pixels))
        index, order = order[:batch_size], order[batch_size:]
        if before_step is not None:
            before_step()
        text = tokenize_captions(tokenizer, [captions[i] for i in index]) if loss != "none" else {}
        total, parts = model(pixels[index], text.get("input_ids"), text.get("attention_mask"), targets[index])
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": total.item(), **parts})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if held_out is not None and (step + 1) % eval_every == 0:
            history[-1]["held_out"] = evaluate_fields(model, *held_out)
            model.train()
            tqdm.write(f"{desc} step {step + 1}: held-out " +
                       ", ".join(f"{k} {v:.2f}" for k, v in history[-1]["held_out"].items()))
        if (allowed := seconds_allowed()) is not None and time.perf_counter() - started > allowed:
            break
    return model.eval(), history


@torch.no_grad()
def evaluate_fields(model: Contrastive, pixels: torch.Tensor, targets: torch.Tensor,
                    batch_size: int = 100) -> dict[str, float]:
    logits = None
    for start in range(0, len(pixels), batch_size):
        tokens = model.clip.vision_model(pixel_values=pixels[start:start + batch_size]).last_hidden_state[:, 1:]
        out = model.heads(tokens, targets[start:start + batch_size])
        logits = out if logits is None else [torch.cat(pair) for pair in zip(logits, out, strict=True)]
    return field_accuracy(logits, targets)


# ---- zero-shot caption scoring --------------------------------------------------------------------------

def caption_of(report: dict) -> str:
    """The first caption template of vlm.synth, with every fact it names."""
    lit = [lamp["label"] for lamp in report["lamps"] if lamp["on"]]
    damage = " and ".join(f"{NOUN[d['type']]} at the {d['location']}" for d in report["damage"])
    return (f"Equipment panel {report['asset_code']} with gauge at {report['gauge_reading']}, "
            f"{', '.join(lit) + ' lit' if lit else 'no lamps lit'}, {damage or 'no visible damage'}.")


def perturbations(report: dict, rng: random.Random) -> dict[str, dict]:
    """The report with one fact changed, per kind of fact: a caption that is wrong about exactly that."""
    out = {}
    code = list(report["asset_code"])
    position = rng.choice([0, 1, 3, 4, 5, 6])
    alphabet = CODE_LETTERS if position < 2 else DIGITS
    code[position] = rng.choice([c for c in alphabet if c != code[position]])
    out["asset_code"] = {**report, "asset_code": "".join(code)}
    lamps = [dict(lamp) for lamp in report["lamps"]]
    flip = rng.randrange(len(lamps))
    lamps[flip]["on"] = not lamps[flip]["on"]
    out["lamp"] = {**report, "lamps": lamps}
    gauge = report["gauge_reading"]
    out["gauge"] = {**report, "gauge_reading": gauge + 25 if gauge < 50 else gauge - 25}
    if report["damage"]:
        out["damage"] = {**report, "damage": []}
    else:
        out["damage"] = {**report, "damage": [{"type": rng.choice(DAMAGE_TYPES), "location": rng.choice(LOCATIONS)}]}
    return out


@torch.no_grad()
def zero_shot(clip: CLIPModel, tokenizer, pixels: torch.Tensor, reports: list[dict], seed: int = 0) -> dict:
    """Caption scoring on held-out panels, no training on this task.

    ``retrieval``: the true caption scores highest among the captions of all evaluated panels.
    ``<fact>``: the true caption beats the same caption with only that fact changed (chance 50%).
    """
    tokenizer.padding_side = "right"
    rng = random.Random(seed)

    def embed_text(reports_: list[dict]) -> torch.Tensor:
        text = tokenize_captions(tokenizer, [caption_of(r) for r in reports_])
        return F.normalize(clip.get_text_features(**text).pooler_output, dim=-1)

    images = F.normalize(torch.cat([clip.get_image_features(pixel_values=pixels[i:i + 100]).pooler_output
                                    for i in range(0, len(pixels), 100)]), dim=-1)
    true = embed_text(reports)
    scores = images @ true.T
    result = {"retrieval": float((scores.argmax(1) == torch.arange(len(reports))).float().mean())}
    wrong = [perturbations(r, rng) for r in reports]
    true_scores = scores.diag()
    for fact in wrong[0]:
        fake = embed_text([w[fact] for w in wrong])
        result[fact] = float(((images * fake).sum(-1) < true_scores).float().mean())
    return result


HEADS_FILE = "fact_heads.safetensors"


def save_tower(model: Contrastive, spec: TowerSpec, out_dir: str | Path) -> Path:
    """The whole CLIPModel (its text half is kept for zero-shot scoring), the image processor, and the
    fact heads (``HEADS_FILE``: the projector is seeded from them) beside it."""
    model.clip.save_pretrained(out_dir)
    image_processor(spec).save_pretrained(out_dir)
    save_file(model.heads.state_dict(), Path(out_dir) / HEADS_FILE)
    if model.loss == "siglip":  # the sigmoid's bias is not a CLIPModel weight: vlm.zeroshot reads it here
        from vlm.zeroshot import write_settings

        write_settings(out_dir, "sigmoid", model.logit_bias.item())
    return Path(out_dir)


def load_heads(tower_dir: str | Path, width: int) -> SpotHeads:
    heads = SpotHeads(width)
    heads.load_state_dict(load_file(Path(tower_dir) / HEADS_FILE))
    return heads.eval()
