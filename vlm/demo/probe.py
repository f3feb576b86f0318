"""Which image size and patch size keep the asset code readable? Equal-budget probes of the tower.

``python -m vlm.demo probe`` trains, for each (image size, patch size), a tower from scratch with the
per-patch fact heads alone for the same number of steps (same images seen), and reports held-out field
accuracy and the seconds each probe took (the CPU is shared, so seconds are indicative only).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from vlm.demo.contrastive import TowerSpec, evaluate_fields, image_processor, spot_targets, train_tower
from vlm.synth.panels import generate_panel, make_report

CANDIDATES = ((128, 8), (128, 16))


def panels_in_memory(seed: int, n: int, spec: TowerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = [], []
    for index in tqdm(range(n), desc=f"panels {spec.image_size}px", unit="panel"):
        image, truth = generate_panel(seed, index, spec.image_size)
        images.append(image)
        targets.append(spot_targets(make_report(truth), truth["camera"]["layout"], spec.patch_size,
                                    spec.image_size // spec.patch_size))
    pixels = image_processor(spec)(images, return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(targets)


def probe(candidates=CANDIDATES, steps: int = 250, batch_size: int = 32, n_train: int = 3000, n_eval: int = 300,
          train_seed: int = 900, eval_seed: int = 901, **spec) -> list[dict]:
    rows = []
    for size, patch in candidates:
        tower = TowerSpec(image_size=size, patch_size=patch, **spec)
        pixels, targets = panels_in_memory(train_seed, n_train, tower)
        eval_pixels, eval_targets = panels_in_memory(eval_seed, n_eval, tower)
        started = time.perf_counter()
        model, history = train_tower(pixels, [""] * len(pixels), targets, None, tower, loss="none", steps=steps,
                                     batch_size=batch_size, desc=f"probe {size}/{patch}")
        row = {"image_size": size, "patch_size": patch, "tokens": (size // patch) ** 2, "steps": len(history),
               "seconds": round(time.perf_counter() - started, 1), **evaluate_fields(model, eval_pixels, eval_targets)}
        print(row, flush=True)
        rows.append(row)
    return rows
