"""Equal-budget probes of the demo's tower.

``python -m tools.demo probe``: which image size and patch size keep the asset code readable? For each
(image size, patch size), a tower from scratch with the per-patch fact heads alone for the same number
of steps (same images seen); held-out field accuracy and the seconds each probe took (the CPU is
shared, so seconds are indicative only).

``python -m tools.demo losses``: the CLIP softmax loss or the SigLIP sigmoid loss? The tower as the recipe
trains it (contrastive loss + fact heads) with each, same panels, seed and steps; the held-out reading
every ``eval_every`` steps and zero-shot caption scoring at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tools.demo.contrastive import (
    TowerSpec,
    caption_of,
    evaluate_fields,
    image_processor,
    spot_targets,
    train_tower,
    zero_shot,
)
from vlm.synth.panels import generate_panel, make_report

CANDIDATES = ((128, 8), (128, 16))


def panels_in_memory(seed: int, n: int, spec: TowerSpec) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Pixels, ``spot_targets`` and reports of ``n`` panels drawn at the tower's size."""
    images, targets, reports = [], [], []
    for index in tqdm(range(n), desc=f"panels {spec.image_size}px", unit="panel"):
        image, truth = generate_panel(seed, index, spec.image_size)
        images.append(image)
        reports.append(make_report(truth))
        targets.append(spot_targets(reports[-1], truth["camera"]["layout"], spec.patch_size,
                                    spec.image_size // spec.patch_size))
    pixels = image_processor(spec)(images, return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(targets), reports


def probe(candidates=CANDIDATES, steps: int = 250, batch_size: int = 32, n_train: int = 3000, n_eval: int = 300,
          train_seed: int = 900, eval_seed: int = 901, **spec) -> list[dict]:
    rows = []
    for size, patch in candidates:
        tower = TowerSpec(image_size=size, patch_size=patch, **spec)
        pixels, targets, _ = panels_in_memory(train_seed, n_train, tower)
        eval_pixels, eval_targets, _ = panels_in_memory(eval_seed, n_eval, tower)
        started = time.perf_counter()
        model, history = train_tower(pixels, [""] * len(pixels), targets, None, tower, loss="none", steps=steps,
                                     batch_size=batch_size, desc=f"probe {size}/{patch}")
        row = {"image_size": size, "patch_size": patch, "tokens": (size // patch) ** 2, "steps": len(history),
               "seconds": round(time.perf_counter() - started, 1), **evaluate_fields(model, eval_pixels, eval_targets)}
        print(row, flush=True)
        rows.append(row)
    return rows


def compare_losses(work: Path, spec: TowerSpec, steps: int = 1000, n_train: int = 20000, n_eval: int = 200,
                   eval_every: int = 250, batch_size: int = 32, lr: float = 2e-3, train_seed: int = 900,
                   eval_seed: int = 901) -> dict[str, dict]:
    """Per loss: the held-out reading curve of the fact heads and the zero-shot caption scores at the end.

    Captions state every fact (``caption_of``); the tokenizer is trained on them, into ``work``.
    """
    from tools.demo.lm import train_tokenizer

    pixels, targets, reports = panels_in_memory(train_seed, n_train, spec)
    eval_pixels, eval_targets, eval_reports = panels_in_memory(eval_seed, n_eval, spec)
    captions = [caption_of(report) for report in reports]
    tokenizer = train_tokenizer(captions, work / "tokenizer", 1024)
    results = {}
    for loss in ("clip", "siglip"):  # a run shorter than eval_every still gets its end measured
        model, history = train_tower(pixels, captions, targets, tokenizer, spec, loss=loss, steps=steps,
                                     batch_size=batch_size, lr=lr, desc=f"tower {loss}",
                                     held_out=(eval_pixels, eval_targets), eval_every=min(eval_every, steps))
        results[loss] = {"held_out_curve": [{"step": h["step"], **h["held_out"]} for h in history if "held_out" in h],
                         "zero_shot": zero_shot(model.clip, tokenizer, eval_pixels, eval_reports)}
        print(loss, {k: round(v, 3) for k, v in results[loss]["held_out_curve"][-1].items()}, flush=True)
    return results
