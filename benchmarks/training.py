"""The training rows: stage 1 and 2 samples/s with the feature cache against without, on the demo's shapes.

The rate is read from the step reports ``vlm.train.loop.train`` hands its ``on_step`` callback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.harness import PeakMemory, Row, Settings, paired, row_from
from vlm import load_config
from vlm.testing import tiny_tower
from vlm.train.loop import StepReport, train

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROJECTOR = load_config(ROOT / "configs" / "demo-align.yaml").model.projector


def prepare_training(work: Path, quick: bool, samples: int) -> tuple[Path, Path, Path]:
    """The demo model's shapes (``tools.demo.recipe``) with random weights, and ``samples`` synthetic panels.

    Like the demo: panels at the tower's resolution and a tokenizer trained on the panel texts, so
    sequences are as long as the demo's. One stage-2 conversation per panel, so both stages see each
    image once per epoch.
    """
    from tools.demo.lm import corpus_texts, lm_config, train_tokenizer
    from tools.demo.recipe import QUICK, QUICK_SPEC, SPEC, Budget
    from vlm.synth import write_dataset

    budget, spec = (QUICK, QUICK_SPEC) if quick else (Budget(), SPEC)
    tower, lm, data = work / "clip", work / "lm", work / "data"
    made = f"{training_parts(quick)}; {samples} panels"  # rebuilt when the demo's shapes change
    if not (work / "made.txt").is_file() or (work / "made.txt").read_text() != made:
        shutil.rmtree(work, ignore_errors=True)
        write_dataset(data, samples, 0, spec.image_size)
        tiny_tower(tower, "clip", image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.width,
                   layers=spec.layers)
        tokenizer = train_tokenizer(corpus_texts(data), lm, budget.vocab_size)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(lm_config(tokenizer, budget.lm_hidden, budget.lm_layers)).save_pretrained(lm)
        conversations = {r["image"]: r for r in json.loads((data / "instruct.json").read_text())}
        (data / "stage2.json").write_text(json.dumps(list(conversations.values())))
        (work / "made.txt").write_text(made)
    return tower, lm, data


def training_parts(quick: bool) -> str:
    from tools.demo.recipe import QUICK, QUICK_SPEC, SPEC, Budget

    budget, spec = (QUICK, QUICK_SPEC) if quick else (Budget(), SPEC)
    return (f"demo-shaped parts: {spec.image_size}-px/{spec.patch_size} {spec.layers}-layer {spec.width}-wide CLIP, "
            f"{DEMO_PROJECTOR}, {budget.lm_layers}-layer {budget.lm_hidden}-wide Qwen2 (vocab {budget.vocab_size})")


def second_epoch_rate(overrides: list[str], clock: str) -> float:
    """Samples/s of a two-epoch ``train`` from the end of its first epoch to its last step, by ``clock``
    (``wall`` or ``cpu``) between the steps' reports: data loading counts, the cache build before epoch 1 not."""
    steps: list[StepReport] = []
    train(load_config(None, overrides), on_step=steps.append)
    second = steps[len(steps) // 2 - 1:]  # two epochs: from the last step of the first

    def at(report: StepReport) -> float:
        return report.cpu_s if clock == "cpu" else report.wall_s

    return sum(report.samples for report in second[1:]) / (at(second[-1]) - at(second[0]))


def training(settings: Settings, memory: PeakMemory) -> list[Row]:
    """Stage 1 and 2 samples/s, with the feature cache against without, from the second epoch on."""
    s = settings
    work = s.workdir / "train"
    tower, lm, data = prepare_training(work, s.quick, s.train_samples)
    note = (f"{s.train_samples} synthetic panels, batch {s.train_batch}, 2 epochs, rate over epoch 2 (the cache "
            f"is built before epoch 1, one tower pass per image); {training_parts(s.quick)}")
    rows = []
    for stage, records, template, target in (("align", "captions.json", "plain", (">=", 1.5)),
                                             ("instruct", "stage2.json", "chat", None)):
        overrides = [f"model.vision_tower={tower}", f"model.language_model={lm}", f"stage={stage}",
                     f"model.projector={DEMO_PROJECTOR}", f"data.path={data / records}",
                     f"data.image_folder={data}", f"data.template={template}",
                     f"data.cache_dir={work / 'feature_cache'}", "data.max_length=1024",
                     f"train.batch_size={s.train_batch}", "train.epochs=2", "train.lora_r=32",
                     "train.lora_alpha=64", f"output_dir={work / 'out'}"]

        def rate(cache: bool, overrides: list[str] = overrides) -> dict:
            return {"samples_per_s": second_epoch_rate([*overrides, f"data.cache_features={cache}"], s.clock)}

        runs = paired(lambda: rate(True), lambda: rate(False), s.repeats, memory)
        rows.append(row_from(f"stage {1 if stage == 'align' else 2} ({stage}) training", "samples/s",
                             "samples_per_s", runs, ("feature cache", "tower every step"), target, note=note))
    return rows
