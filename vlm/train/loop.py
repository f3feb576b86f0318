"""One training loop for both stages, under Accelerate: one CPU to many GPUs, exact resume."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vlm.config import Config
from vlm.data.cache import FeatureCache, record_image_key
from vlm.data.dataset import LengthGroupedSampler, VLMDataset, collate
from vlm.data.formats import load_records
from vlm.data.preflight import SKIPPED_FILE, check_records, enforce
from vlm.model import ADAPTER_DIR, VLM, build_vlm, load_pretrained
from vlm.processor import VLMProcessor
from vlm.train.stages import configure_stage, parameter_groups, trainable_state_dict, trainable_table

CHECKPOINTS = "checkpoints"
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "vision_features")


def train(config: Config) -> Path:
    """Run one stage; returns the folder of the final model."""
    output_dir = Path(config.output_dir)
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        # Without a GPU, Accelerate forms a process group (gloo) only when told the run is on the CPU.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=config.train.mixed_precision, log_with=config.train.log_with, project_dir=str(output_dir),
        # A text-only micro-batch leaves the projector without a gradient; DDP must not wait for it.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if multi_process else [],
    )
    set_seed(config.seed)
    if config.init_from:
        model, processor = load_pretrained(config.init_from)
        config.model = model.config
    else:
        model, processor = build_vlm(config.model, load_in_4bit=config.train.load_in_4bit)
    model = configure_stage(model, config)
    accelerator.print(trainable_table(model))

    dataset = _dataset(config, model, processor, accelerator)
    train_config = config.train
    world = accelerator.num_processes
    global_batch = train_config.batch_size * train_config.grad_accum * world
    # Batches are grouped per global step, so 1 x B and 2 x B/2 see the very same samples in each step.
    sampler = LengthGroupedSampler(dataset.lengths, train_config.batch_size * world, seed=config.seed,
                                   group_by_length=train_config.group_by_length)
    loader = DataLoader(dataset, batch_size=train_config.batch_size, sampler=sampler,
                        num_workers=config.data.num_workers,
                        collate_fn=partial(collate, pad_token_id=processor.tokenizer.pad_token_id))
    micro_batches_per_epoch = math.ceil(len(dataset) / (train_config.batch_size * world))
    steps_per_epoch = math.ceil(micro_batches_per_epoch / train_config.grad_accum)
    total_steps = train_config.max_steps or math.ceil(train_config.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=train_config.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(train_config.warmup_ratio * total_steps), total_steps)
    # The scheduler stays unprepared: Accelerate would step it once per process, which makes the learning
    # rate depend on the world size. It steps once per optimizer step and is checkpointed alongside.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(_keep_trainable_only)
    accelerator.print(f"processes {world} | per-device batch {train_config.batch_size} | grad accumulation "
                      f"{train_config.grad_accum} | global batch {global_batch} | {len(dataset)} samples | "
                      f"{steps_per_epoch} steps/epoch | {total_steps} steps")
    if config.train.log_with:
        accelerator.init_trackers("vlm", config={"stage": config.stage, "lr": train_config.lr})

    step = _resume(accelerator, config, output_dir)
    history = _read_history(output_dir, step) if step else []
    seconds_before = history[-1].get("seconds", 0.0) if history else 0.0  # training time before a resume
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc=config.stage)
    started = time.perf_counter()
    samples_seen = 0
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        # Accelerate's loaders set the sampler's epoch from their own iteration count when iterated, and a
        # loader made by skip_first_batches starts that count at 0: set it on whichever loader runs.
        batches = accelerator.skip_first_batches(loader, done_in_epoch * train_config.grad_accum) \
            if done_in_epoch else loader
        batches.set_epoch(epoch)
        for window in _windows(iter(batches), train_config.grad_accum):
            loss, samples = _optimizer_step(accelerator, model, optimizer, scheduler, window, train_config)
            step += 1
            samples_seen += samples * world
            rate = samples_seen / (time.perf_counter() - started)
            lr = scheduler.get_last_lr()[0]
            history.append({"step": step, "loss": loss, "lr": lr, "seconds": round(seconds_before + time.perf_counter() - started, 3)})
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_per_s=f"{rate:.1f}")
            if config.train.log_with:
                accelerator.log({"loss": loss, "lr": lr}, step=step)
            if train_config.save_every and step % train_config.save_every == 0 and step < total_steps:
                _save_checkpoint(accelerator, output_dir, step, history)
            if step >= total_steps:
                break
    progress.close()
    final = _save_final(accelerator, model, processor, config, history)
    accelerator.end_training()
    # Drop every reference before the process group goes: two-process gloo runs were seen to hang at exit.
    del model, optimizer, loader, scheduler
    accelerator.free_memory()
    return final


def _optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, window: list[dict],
                    train_config) -> tuple[float, int]:
    """One optimizer step over a window of micro-batches.

    The loss is the mean over the supervised tokens of the whole global batch (every micro-batch on every
    process), so the step does not depend on how the batch is split: each micro-batch's token-loss sum is
    divided by that global count (times the world size, because DDP averages gradients).
    """
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    global_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=accelerator.device), "sum")
    divisor = global_tokens / accelerator.num_processes
    loss_sum = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(window):
        last = index == len(window) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and v is not None}
            loss = model(**inputs, num_items_in_batch=divisor).loss
            accelerator.backward(loss)
        loss_sum += loss.detach() * divisor
    if train_config.max_grad_norm:
        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], train_config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total = accelerator.reduce(loss_sum, "sum") / global_tokens.clamp(min=1)
    return float(total), sum(len(b["labels"]) for b in window)


def _windows(batches, size: int):
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _dataset(config: Config, model: VLM, processor: VLMProcessor, accelerator: Accelerator) -> VLMDataset:
    """Preflight every record; refuse to train over too many bad ones; say which ones are skipped."""
    data = config.data
    if not data.path:
        raise ValueError("data.path is not set")
    records = load_records(data.path, image_column=data.image_column)
    report = check_records(records, processor, data)
    accelerator.print(report.format())
    skip_ids = enforce(report, data.max_bad_fraction, config.output_dir if accelerator.is_main_process else None,
                       data.on_too_long)
    if skip_ids:
        accelerator.print(f"skipping {len(skip_ids)} of {len(records)} records "
                          f"(ids in {Path(config.output_dir) / SKIPPED_FILE})")
    cache, image_keys = None, {}
    if data.cache_features:
        # Each image file is hashed once, here: the cache is built and read by these keys.
        image_keys = {i: [record_image_key(image, data.image_folder) for image in records[i].images]
                      for i in report.lengths if records[i].id not in skip_ids}
        images = {key: image for i, keys in image_keys.items() for key, image in zip(keys, records[i].images, strict=True)}
        root = data.cache_dir or Path(config.output_dir) / "feature_cache"
        built = FeatureCache.build(model, processor, images, data.image_folder, root, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        cache = FeatureCache(built.folder)  # reopened: every process reads the index the main process wrote
    return VLMDataset(records, processor, data, report.lengths, skip_ids=skip_ids, feature_cache=cache,
                      image_keys=image_keys)


def _keep_trainable_only(models, weights, output_dir) -> None:
    for index, model in enumerate(models):
        weights[index] = trainable_state_dict(model)


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in (output_dir / CHECKPOINTS).glob("step_*") if (p / "progress.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, history: list[dict]) -> None:
    """Write to a temporary folder, then rename: a crash mid-save leaves the last good checkpoint."""
    final = output_dir / CHECKPOINTS / f"step_{step}"
    partial_dir = output_dir / CHECKPOINTS / f".partial_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial_dir))
    if accelerator.is_main_process:
        (partial_dir / "progress.json").write_text(json.dumps({"step": step}))
        (partial_dir / "history.json").write_text(json.dumps(history))
        os.replace(partial_dir, final)
        for old in _checkpoints(output_dir)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, config: Config, output_dir: Path) -> int:
    if not config.resume:
        return 0
    if isinstance(config.resume, str):
        checkpoint = Path(config.resume)
    else:
        found = _checkpoints(output_dir)
        if not found:
            accelerator.print(f"resume: no checkpoint in {output_dir / CHECKPOINTS}; starting from step 0")
            return 0
        checkpoint = found[-1]
    if not (checkpoint / "progress.json").is_file():
        raise ValueError(f"resume: {checkpoint} is not a complete checkpoint (no progress.json)")
    accelerator.load_state(str(checkpoint), strict=False)
    step = json.loads((checkpoint / "progress.json").read_text())["step"]
    accelerator.print(f"resumed from {checkpoint} at step {step}")
    return step


def _read_history(output_dir: Path, step: int) -> list[dict]:
    found = [c for c in _checkpoints(output_dir) if int(c.name.split("_")[1]) == step]
    return json.loads((found[0] / "history.json").read_text()) if found else []


def _save_final(accelerator: Accelerator, model, processor: VLMProcessor, config: Config,
                history: list[dict]) -> Path:
    """align: config + projector (the config names the base tower and LM). instruct: + the LoRA adapter."""
    accelerator.wait_for_everyone()
    out = Path(config.output_dir) / "final"
    if accelerator.is_main_process:
        vlm: VLM = accelerator.unwrap_model(model)
        if config.stage == "instruct" and config.train.full_finetune:
            vlm.save_pretrained(out, processor, full=True)
        else:
            vlm.save_pretrained(out, processor, full=False)
            if config.stage == "instruct":
                vlm.language_model.save_pretrained(out / ADAPTER_DIR, save_embedding_layers=False)
        (Path(config.output_dir) / "history.json").write_text(json.dumps(history))
        _plot_loss(history, Path(config.output_dir) / "loss.png")
        accelerator.print(f"saved {out}")
    accelerator.wait_for_everyone()
    return out


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    if not history:
        return
    figure, axis = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([h["step"] for h in history], [h["loss"] for h in history], linewidth=1.2)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (mean over supervised tokens)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
