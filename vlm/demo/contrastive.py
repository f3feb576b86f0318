"""A small CLIP tower trained on image-caption pairs, with the CLIP softmax loss or the SigLIP sigmoid loss.

Both losses compare every image of a batch with every caption of it. On the panels, telling the
captions of one batch apart needs only a few coarse facts (the gauge alone often does), so the
contrastive loss by itself leaves the small print unread. Each training step therefore adds a
caption-field loss: heads on the tower's patch tokens predict the facts the caption states (asset
code characters, lamp states, gauge, damage per cell, warning label). It is the same supervision as
the caption, made dense, in the spirit of CoCa's captioning loss beside the contrastive one; it
trains the patch tokens the VLM reads. The heads are dropped after training.

Measured on this CPU (held-out panels, 128 px, patch 16): with learned-query attention heads alone
the tower stayed at chance on every field for 1,750 steps of 32 images; a linear readout over the
whole token grid (``GridHeads``) had the warning label at 95% after 100 steps. Both are used.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from vlm.synth import NOUN
from vlm.synth.panels import CODE_LETTERS, DAMAGE_TYPES, LAMP_LABELS, LOCATIONS
from vlm.testing import CLIP_MEAN, CLIP_STD

DIGITS = "0123456789"
# One classifier per fact: 2 code letters, 4 code digits, a state per lamp label (absent/off/on),
# the gauge reading, the damage in each of the 9 cells (none or a type), the warning label.
FIELDS = ([("code_letter", len(CODE_LETTERS))] * 2 + [("code_digit", 10)] * 4 + [("lamp", 3)] * len(LAMP_LABELS)
          + [("gauge", 101)] + [("damage", 1 + len(DAMAGE_TYPES))] * len(LOCATIONS) + [("warning", 2)])
GAUGE_SIGMA = 1.5  # gauge targets are soft: 42 vs 43 is a near miss, not a wrong class


def field_targets(report: dict) -> list[int]:
    """The class of every field in ``FIELDS`` for one panel's report."""
    code = report["asset_code"]
    lamps = {lamp["label"]: 1 + int(lamp["on"]) for lamp in report["lamps"]}
    damage = {item["location"]: 1 + DAMAGE_TYPES.index(item["type"]) for item in report["damage"]}
    return ([CODE_LETTERS.index(c) for c in code[:2]] + [DIGITS.index(c) for c in code[3:]]
            + [lamps.get(label, 0) for label in LAMP_LABELS] + [report["gauge_reading"]]
            + [damage.get(loc, 0) for loc in LOCATIONS] + [int(report["warning_label"])])


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


class GridHeads(nn.Module):
    """One linear readout per field over the whole token grid: each token must say what lies under it."""

    def __init__(self, width: int, tokens: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width * tokens, sum(classes for _, classes in FIELDS))

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        logits = self.readout(self.token_norm(tokens).flatten(1))
        return list(logits.split([classes for _, classes in FIELDS], dim=-1))


class BothHeads(nn.Module):
    """Grid readout plus attention queries, logits summed: the grid learns fast, the queries can follow
    a tag that moves from panel to panel."""

    def __init__(self, grid: GridHeads, attention: FieldHeads) -> None:
        super().__init__()
        self.grid, self.attention = grid, attention

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [a + b for a, b in zip(self.grid(tokens), self.attention(tokens), strict=True)]


class FieldHeads(nn.Module):
    """Learned queries read the patch tokens by cross-attention; one linear classifier per field."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(len(FIELDS), width) * 0.02)
        self.token_norm = nn.LayerNorm(width)  # the residual stream is not normalised at the last layer
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.classifiers = nn.ModuleList(nn.Linear(width, classes) for _, classes in FIELDS)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        queries = self.queries.unsqueeze(0).expand(len(tokens), -1, -1)
        tokens = self.token_norm(tokens)
        pooled = self.norm(self.attention(queries, tokens, tokens, need_weights=False)[0])
        return [classifier(pooled[:, i]) for i, classifier in enumerate(self.classifiers)]


def field_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean over fields of each field's cross-entropy in units of its chance level (log of its class count),
    so the 101-way gauge does not drown the 2-way warning label."""
    losses = []
    for i, ((kind, classes), field_logits) in enumerate(zip(FIELDS, logits, strict=True)):
        if kind == "gauge":
            values = torch.arange(classes, dtype=field_logits.dtype, device=field_logits.device)
            soft = torch.softmax(-((values[None] - targets[:, i, None]) ** 2) / (2 * GAUGE_SIGMA ** 2), -1)
            losses.append(-(soft * field_logits.log_softmax(-1)).sum(-1).mean() / math.log(classes))
        else:
            losses.append(F.cross_entropy(field_logits, targets[:, i]) / math.log(classes))
    return torch.stack(losses).mean()


def field_accuracy(logits: list[torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy per kind of field; the asset code also as an exact match of all six characters."""
    hits: dict[str, list[torch.Tensor]] = {}
    for i, ((kind, _), field_logits) in enumerate(zip(FIELDS, logits, strict=True)):
        predicted = field_logits.argmax(-1)
        hit = (predicted - targets[:, i]).abs() <= 5 if kind == "gauge" else predicted == targets[:, i]
        hits.setdefault(kind, []).append(hit)
    result = {kind: float(torch.stack(h).float().mean()) for kind, h in hits.items()}
    result["code_exact"] = float(torch.stack(hits["code_letter"] + hits["code_digit"]).all(0).float().mean())
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
    heads: str = "both"  # caption-field readout: grid | attention | both


def build_clip(spec: TowerSpec, vocab_size: int, eos_token_id: int, pad_token_id: int) -> CLIPModel:
    vision = dict(hidden_size=spec.width, intermediate_size=4 * spec.width, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.width // 32, image_size=spec.image_size, patch_size=spec.patch_size)
    text = dict(hidden_size=spec.text_width, intermediate_size=4 * spec.text_width, num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_width // 32, vocab_size=vocab_size, max_position_embeddings=128,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=eos_token_id)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.embed_dim))
    zero_residual_branches(model.vision_model)
    return model


def zero_residual_branches(vision_model: nn.Module) -> None:
    """Start every attention and MLP branch at zero, so the tower begins as its patch embedding.

    The field heads can then read pixel features from the first step while the layers learn what to
    add (skip-init, as LayerScale or Fixup do). From the default init, a tower this size sat at chance
    on every field for the first ~50k images; with it, learning starts at once (see recipe.json).
    """
    with torch.no_grad():
        for layer in vision_model.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()


def image_processor(spec: TowerSpec) -> CLIPImageProcessorPil:
    size = spec.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=CLIP_MEAN, image_std=CLIP_STD)


class Contrastive(nn.Module):
    """CLIPModel + the bias SigLIP adds to its logits + the caption-field heads."""

    def __init__(self, clip: CLIPModel, loss: str, heads: str = "both") -> None:
        super().__init__()
        self.clip, self.loss = clip, loss
        vision = clip.config.vision_config
        grid = GridHeads(vision.hidden_size, (vision.image_size // vision.patch_size) ** 2)
        attention = FieldHeads(vision.hidden_size)
        self.heads = {"grid": grid, "attention": attention, "both": BothHeads(grid, attention)}[heads]
        if loss == "siglip":  # the paper's initialisation: t' = log 10, b = -10
            with torch.no_grad():
                clip.logit_scale.fill_(math.log(10))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        vision = self.clip.vision_model(pixel_values=pixel_values)
        fields = field_loss(self.heads(vision.last_hidden_state[:, 1:]), targets)
        if self.loss == "none":
            return fields, {"fields": fields.item()}
        image_embeds = self.clip.visual_projection(vision.pooler_output)
        text_embeds = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        if self.loss == "clip":
            contrast = clip_loss(image_embeds, text_embeds, self.clip.logit_scale)
        else:
            contrast = siglip_loss(image_embeds, text_embeds, self.clip.logit_scale, self.logit_bias)
        return contrast + fields, {"contrastive": contrast.item(), "fields": fields.item()}


def tokenize_captions(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """Captions end in eos: CLIP's text tower pools the hidden state at the first eos."""
    return tokenizer([c + tokenizer.eos_token for c in captions], padding=True, return_tensors="pt",
                     add_special_tokens=False)


def train_tower(pixels: torch.Tensor, captions: list[str], targets: torch.Tensor, tokenizer, spec: TowerSpec,
                loss: str = "clip", steps: int = 400, max_seconds: float | None = None, batch_size: int = 64,
                lr: float = 1e-3, seed: int = 0, desc: str = "tower",
                held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                eval_every: int = 250) -> tuple[Contrastive, list[dict]]:
    """Train from random weights; ``max_seconds`` stops early on a wall-time budget (the CPU is shared).

    With ``held_out`` (pixels, targets), field accuracy on them is logged every ``eval_every`` steps.
    """
    torch.manual_seed(seed)
    if tokenizer is None:  # field heads alone (the resolution probe): any text tower will do, it is unused
        clip = build_clip(spec, 16, 1, 0)
    else:
        tokenizer.padding_side = "right"
        clip = build_clip(spec, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = Contrastive(clip, loss, spec.heads)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    warmup, started = min(50, max(1, steps // 20)), time.perf_counter()

    def progress(step: int) -> float:  # on a time budget, the cosine follows the clock
        done = step / steps
        return max(done, (time.perf_counter() - started) / max_seconds) if max_seconds else done

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                                 (1 + math.cos(math.pi * min(progress(s), 1.0))))
    order, rng, history = [], random.Random(seed), []
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, unit="step")):
        if len(order) < batch_size:  # epochs of a fresh permutation, so each batch holds distinct panels
            order += rng.sample(range(len(pixels)), len(pixels))
        index, order = order[:batch_size], order[batch_size:]
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
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
    return model.eval(), history


@torch.no_grad()
def evaluate_fields(model: Contrastive, pixels: torch.Tensor, targets: torch.Tensor,
                    batch_size: int = 100) -> dict[str, float]:
    logits = None
    for start in range(0, len(pixels), batch_size):
        tokens = model.clip.vision_model(pixel_values=pixels[start:start + batch_size]).last_hidden_state[:, 1:]
        out = model.heads(tokens)
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


def save_tower(model: Contrastive, spec: TowerSpec, out_dir: str | Path) -> Path:
    """The whole CLIPModel (its text half is kept for zero-shot scoring) and the image processor beside it."""
    model.clip.save_pretrained(out_dir)
    image_processor(spec).save_pretrained(out_dir)
    return Path(out_dir)
