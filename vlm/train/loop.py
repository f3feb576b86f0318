"""One training loop for both stages, under Accelerate: one CPU to many GPUs, exact resume.

A checkpoint holds no pickle (safetensors and JSON), so resuming from a folder never runs code from it,
and it is stamped with the run's settings and data, so a resume continues that run or refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vlm.config import Config
from vlm.data.cache import FeatureCache, record_image_key
from vlm.data.dataset import FAILURES_FILE, LengthGroupedSampler, VLMDataset, collate
from vlm.data.formats import DataError, load_records
from vlm.data.preflight import SKIPPED_FILE, cached_check, enforce
from vlm.files import write_atomic
from vlm.loading import build_vlm, load_pretrained
from vlm.model import ADAPTER_DIR, VLM
from vlm.processor import VLMProcessor
from vlm.train.stages import configure_stage, parameter_groups, trainable_state_dict, trainable_table

CHECKPOINTS = "checkpoints"
FINAL = "final"
PROGRESS_FILE = "progress.json"  # step, scheduler, grad scaler; its presence marks a complete checkpoint
RUN_FILE = "run.json"  # the settings and data fingerprint of the run a checkpoint belongs to
MODEL_FILE = "model.safetensors"  # trainable weights only
OPTIMIZER_FILE, OPTIMIZER_LAYOUT_FILE = "optimizer.safetensors", "optimizer.json"
HISTORY_FILE = "history.json"
PREFLIGHT_DIR = "preflight_cache"  # under data.cache_dir, else output_dir: reports by data and settings
# Settings a resume may change: they change where things go or what is shown, not what is computed.
FREE_ON_RESUME = {"resume", "overwrite", "output_dir", "train.save_every", "train.log_every", "train.log_with",
                  "data.num_workers", "data.cache_features", "data.cache_dir"}
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "vision_features", "spatial_shapes")


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One optimizer step, as ``train``'s ``on_step`` hears of it; counts are over every process."""

    step: int  # 1 for the first step of a run, counted on across a resume
    total_steps: int
    epoch: int  # 0-based
    loss: float  # mean over the step's supervised tokens
    samples: int
    tokens: int  # supervised (label) tokens
    learning_rates: dict[str, float]  # by parameter group: "projector", and "language_model" when it trains
    wall_s: float  # time.perf_counter() when the step ended
    cpu_s: float  # time.process_time() when the step ended: this process's CPU time, every thread


def train(config: Config, *, on_step: Callable[[StepReport], None] | None = None) -> Path:
    """Run one stage; returns the folder of the final model.

    ``on_step`` is called on the main process after every optimizer step, before any checkpoint of it is
    written; its own time falls between two steps' ``wall_s``.
    """
    output_dir = Path(config.output_dir)
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        # Without a GPU, Accelerate forms a process group (gloo) only when told the run is on the CPU.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=config.train.mixed_precision, log_with=config.train.log_with, project_dir=str(output_dir),
        # A text-only micro-batch leaves the projector without a gradient; DDP must not wait for it.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if multi_process else [],
    )
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) and (
            config.train.save_every or config.resume):
        raise ValueError(f"train.save_every and resume work under one process or DDP, not "
                         f"{accelerator.distributed_type.value}: its sharded state has no checkpoint format here yet")
    _check_writable(output_dir)
    run = {"settings": _settings(config, accelerator.num_processes), "data": _fingerprint(config.data.path)}
    checkpoint = _start(accelerator, config, output_dir, run)
    set_seed(config.seed)
    if config.init_from:
        model, processor = load_pretrained(config.init_from, load_in_4bit=config.train.load_in_4bit, base=config.model)
        config.model = model.config
    else:
        model, processor = build_vlm(config.model, load_in_4bit=config.train.load_in_4bit)
    model = configure_stage(model, config)
    accelerator.print(trainable_table(model))
    _check_room(model, config, output_dir)

    dataset = _dataset(config, model, processor, accelerator, data_digest=run["data"])
    train_config = config.train
    world = accelerator.num_processes
    global_batch = train_config.batch_size * train_config.grad_accum * world
    loader = _loader(config, dataset, processor, world, pin_memory=accelerator.device.type == "cuda")
    micro_batches_per_epoch = math.ceil(len(dataset) / (train_config.batch_size * world))
    steps_per_epoch = math.ceil(micro_batches_per_epoch / train_config.grad_accum)
    total_steps = train_config.max_steps or math.ceil(train_config.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=train_config.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(train_config.warmup_ratio * total_steps), total_steps)
    # The scheduler stays unprepared: Accelerate would step it once per process, which makes the learning
    # rate depend on the world size. It steps once per optimizer step and is checkpointed alongside.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.print(f"processes {world} | per-device batch {train_config.batch_size} | grad accumulation "
                      f"{train_config.grad_accum} | global batch {global_batch} | {len(dataset)} samples | "
                      f"{steps_per_epoch} steps/epoch | {total_steps} steps")
    if config.train.log_with:
        accelerator.init_trackers("vlm", config={"stage": config.stage, "lr": train_config.lr})

    step, history = 0, []
    if checkpoint is not None:
        step, history = _load_checkpoint(accelerator, model, optimizer, scheduler, checkpoint)
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
            loss, samples, tokens = _optimizer_step(accelerator, model, optimizer, scheduler, window, train_config)
            ended, ended_cpu = time.perf_counter(), time.process_time()
            step += 1
            samples_seen += samples
            rate = samples_seen / (ended - started)
            rates = scheduler.get_last_lr()  # [projector] or [projector, LM]: "lr" is the LM's when it trains
            lr = rates[-1]
            if on_step is not None and accelerator.is_main_process:
                by_group = {group["name"]: value for group, value in zip(optimizer.param_groups, rates, strict=True)}
                on_step(StepReport(step=step, total_steps=total_steps, epoch=epoch, loss=loss, samples=samples,
                                   tokens=tokens, learning_rates=by_group, wall_s=ended, cpu_s=ended_cpu))
            history.append({"step": step, "loss": loss, "lr": lr, **({"projector_lr": rates[0]} if len(rates) > 1 else {}),
                            "seconds": round(seconds_before + ended - started, 3)})
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_per_s=f"{rate:.1f}")
            if config.train.log_with:
                accelerator.log({"loss": loss, "lr": lr}, step=step)
            if train_config.save_every and step % train_config.save_every == 0 and step < total_steps:
                _save_checkpoint(accelerator, model, optimizer, scheduler, output_dir, step, history, run)
            if step >= total_steps:
                break
    progress.close()
    _report_failures(accelerator, output_dir)
    final = _save_final(accelerator, model, processor, config, history)
    accelerator.end_training()
    # Drop every reference before the process group goes: two-process gloo runs were seen to hang at exit.
    del model, optimizer, loader, scheduler
    accelerator.free_memory()
    return final


def _optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, window: list[dict],
                    train_config) -> tuple[float, int, int]:
    """One optimizer step over a window of micro-batches; returns the loss, samples and supervised tokens.

    The loss is the mean over the supervised tokens of the whole global batch (every micro-batch on every
    process), so the step does not depend on how the batch is split: each micro-batch's token-loss sum is
    divided by that global count (times the world size, because DDP averages gradients).
    """
    local = [sum(int((b["labels"][:, 1:] != -100).sum()) for b in window), sum(len(b["labels"]) for b in window)]
    # One collective for both counts: the global token count weighs the loss, the samples are reported.
    global_tokens, global_samples = accelerator.reduce(torch.tensor(local, dtype=torch.float32,
                                                                    device=accelerator.device), "sum")
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
    return float(total), int(global_samples), int(global_tokens)


def _windows(batches, size: int):
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _dataset(config: Config, model: VLM, processor: VLMProcessor, accelerator: Accelerator,
             data_digest: str | None) -> VLMDataset:
    """Preflight every record, once per data set and settings (each node's first process checks, in worker
    processes; every other rank, a resume and the next run read its cached report); refuse to train over
    too many bad ones; say which ones are skipped."""
    data = config.data
    if not data.path:
        raise ValueError("data.path is not set")
    records = load_records(data.path, image_column=data.image_column)
    folder = Path(data.cache_dir or config.output_dir) / PREFLIGHT_DIR
    report, checked = cached_check(records, processor, data, folder, data_digest,
                                   computes=accelerator.is_local_main_process)
    accelerator.print(report.format() + ("" if checked else f"\n  (the report cached in {folder}: not checked again)"))
    skip_ids = enforce(report, data.max_bad_fraction, config.output_dir if accelerator.is_main_process else None,
                       data.on_too_long)
    if skip_ids:
        accelerator.print(f"skipping {len(skip_ids)} of {len(records)} records "
                          f"(ids in {Path(config.output_dir) / SKIPPED_FILE})")
    failures = Path(config.output_dir) / FAILURES_FILE
    if accelerator.is_main_process and not config.resume:
        failures.unlink(missing_ok=True)  # a resumed run goes on counting its own
    cache, image_keys = None, {}
    if data.cache_features:
        # Each image file is hashed once, here: the cache is built and read by these keys.
        images = {}
        for i in report.lengths:
            record_images = records[i].images
            image_keys[i] = [record_image_key(image, data.image_folder) for image in record_images]
            images.update(zip(image_keys[i], record_images, strict=True))
        root = data.cache_dir or Path(config.output_dir) / "feature_cache"
        built = FeatureCache.build(model, processor, images, data.image_folder, root, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        cache = FeatureCache(built.folder)  # reopened: every process reads the index the main process wrote
    accelerator.wait_for_everyone()  # every rank has the report, and an old failures file is gone
    dataset = VLMDataset(records, processor, data, report.lengths, skip_ids=skip_ids, feature_cache=cache,
                         image_keys=image_keys, failures_file=failures)
    if len(dataset) == 0:
        raise DataError(f"{data.path}: no record left to train on ({len(records)} read, {len(skip_ids)} skipped)")
    return dataset


def _loader(config: Config, dataset: VLMDataset, processor: VLMProcessor, world: int,
            pin_memory: bool = False) -> DataLoader:
    """Worker processes decode and preprocess ahead of the step (data.num_workers, prefetch 4 batches each);
    pinned batches copy to a GPU without blocking."""
    train_config, workers = config.train, config.data.num_workers
    # Batches are grouped per global step, so 1 x B and 2 x B/2 see the very same samples in each step.
    sampler = LengthGroupedSampler(dataset.lengths, train_config.batch_size * world, seed=config.seed,
                                   group_by_length=train_config.group_by_length)
    # Its own generator: each new iterator draws a seed from it, never from the global RNG that dropout
    # uses, so a run resumed mid-epoch (one more iterator) draws the same dropout masks.
    return DataLoader(dataset, batch_size=train_config.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(config.seed),
                      collate_fn=partial(collate, pad_token_id=processor.tokenizer.pad_token_id))


def _report_failures(accelerator: Accelerator, output_dir: Path) -> None:
    """The end-of-run line on samples skipped because their image failed to decode (every rank's, every worker's)."""
    failures = output_dir / FAILURES_FILE
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process or not failures.is_file():
        return
    found = [json.loads(line) for line in failures.read_text(encoding="utf-8").splitlines() if line.strip()]
    if found:
        ids = sorted({failure["id"] for failure in found})
        shown = ", ".join(ids[:5]) + (f", ... {len(ids) - 5} more" if len(ids) > 5 else "")
        accelerator.print(f"decode failures: {len(found)} sample(s) skipped mid-run, {len(ids)} record(s) "
                          f"(ids: {shown}); details in {failures}")


def _check_writable(output_dir: Path) -> None:
    """Find an output folder that cannot be written now, not at the first save after hours of training."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output_dir {output_dir} cannot be written: {error.strerror or error}") from None


def _check_room(model: VLM, config: Config, output_dir: Path) -> None:
    """Refuse to start without room for a checkpoint (trainable weights + AdamW's two moments) and the result."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    full = config.stage == "instruct" and config.train.full_finetune
    result = sum(p.numel() * p.element_size() for p in model.parameters()) if full else trainable
    need = result + (3 * trainable if config.train.save_every else 0)
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise ValueError(f"output_dir {output_dir} has {free / 1e6:.1f} MB free; this run writes about "
                         f"{need / 1e6:.1f} MB (its result, and a checkpoint: {trainable / 1e6:.1f} MB of trainable "
                         f"weights and two AdamW moments)")


def _settings(config: Config, processes: int) -> dict:
    """What makes a run this run: every setting but those that do not change what is computed."""
    flat = {}

    def walk(values: dict, prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif prefix + key not in FREE_ON_RESUME:
                flat[prefix + key] = value

    walk(dataclasses.asdict(config), "")
    flat["processes"] = processes
    return json.loads(json.dumps(flat))  # as a checkpoint reads it back: tuples become lists


def _fingerprint(path: str | None) -> str | None:
    """sha256 of the data file (of every file in a dataset folder, with its name)."""
    root = Path(path) if path else None
    if root is None or not root.exists():
        return None  # nothing to train on: the data checks say so
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]:
        digest.update(str(file.relative_to(root) if root.is_dir() else "").encode() + b"\0")
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _start(accelerator: Accelerator, config: Config, output_dir: Path, run: dict) -> Path | None:
    """The checkpoint to resume from, if any. An output folder belongs to one run: another run's
    checkpoints are neither resumed nor mixed with this run's (whose saves would delete them)."""
    found = _checkpoints(output_dir)
    if config.overwrite:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for old in (output_dir / CHECKPOINTS, output_dir / FINAL):
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return None
    if found and not config.resume:
        raise ValueError(f"output_dir {output_dir} holds another run's checkpoints (up to {found[-1].name}): "
                         f"resume=true continues that run, overwrite=true deletes them")
    if found:
        _same_run(found[-1], run, config)  # resume=PATH too: this run's saves go beside them
    if isinstance(config.resume, str):
        checkpoint = Path(config.resume)
        if not (checkpoint / PROGRESS_FILE).is_file():
            raise ValueError(f"resume: {checkpoint} is not a complete checkpoint (no {PROGRESS_FILE})")
        _same_run(checkpoint, run, config)
        return checkpoint
    if config.resume and not found:
        accelerator.print(f"resume: no checkpoint in {output_dir / CHECKPOINTS}; starting from step 0")
    return found[-1] if config.resume and found else None


def _same_run(checkpoint: Path, run: dict, config: Config) -> None:
    """Refuse, in one line, to continue a run with other settings or other data."""
    try:
        stamp = json.loads((checkpoint / RUN_FILE).read_text())
        settings, data = stamp["settings"], stamp["data"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"resume: {checkpoint} has no readable {RUN_FILE} (written by an older version?): "
                         f"start afresh with overwrite=true") from None
    differ = [k for k in sorted(settings.keys() | run["settings"].keys()) if settings.get(k) != run["settings"].get(k)]
    if differ:
        key = differ[0]
        raise ValueError(f"resume: {checkpoint} is of a run with {key}={settings.get(key)!r}, this one has "
                         f"{key}={run['settings'].get(key)!r} ({len(differ)} setting(s) differ: {', '.join(differ)}); "
                         f"use another output_dir or overwrite=true")
    if data != run["data"]:
        raise ValueError(f"resume: data file {config.data.path} changed since {checkpoint} was written "
                         f"(sha256 {str(data)[:12]} then, {str(run['data'])[:12]} now)")


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in (output_dir / CHECKPOINTS).glob("step_*") if (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _save_checkpoint(accelerator: Accelerator, model, optimizer, scheduler, output_dir: Path, step: int,
                     history: list[dict], run: dict) -> None:
    """Write to a temporary folder, then rename: a crash mid-save leaves the last good checkpoint.

    No pickle: weights, optimizer moments and RNG states are safetensors, the rest JSON. Every process
    saves its own RNG state; the main process the rest (DDP keeps the others identical).
    """
    final = output_dir / CHECKPOINTS / f"step_{step}"
    partial_dir = output_dir / CHECKPOINTS / f".partial_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial_dir, ignore_errors=True)
        partial_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_rng(partial_dir, accelerator.process_index)
    if accelerator.is_main_process:
        save_file(_unshared(trainable_state_dict(accelerator.unwrap_model(model))), partial_dir / MODEL_FILE)
        _save_optimizer(optimizer, partial_dir)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        (partial_dir / HISTORY_FILE).write_text(json.dumps(history))
        (partial_dir / RUN_FILE).write_text(json.dumps(run))
        (partial_dir / PROGRESS_FILE).write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                              "scaler": scaler}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # resumed from an earlier step: the same state again
        os.replace(partial_dir, final)
        earlier = [c for c in _checkpoints(output_dir) if int(c.name.split("_")[1]) < step]
        for old in [c for c in _checkpoints(output_dir) if c != final and c not in earlier[-1:]]:
            shutil.rmtree(old, ignore_errors=True)  # keep this one and the one before it
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Accelerator, model, optimizer, scheduler, checkpoint: Path) -> tuple[int, list]:
    """Restore what ``_save_checkpoint`` wrote, exactly; returns the step and the loss history."""
    progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
    vlm = accelerator.unwrap_model(model)
    weights = load_file(checkpoint / MODEL_FILE)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise ValueError(f"resume: {checkpoint / MODEL_FILE} holds other weights than this run trains "
                         f"({len(set(weights) ^ trainable)} name(s) differ)")
    vlm.load_state_dict(weights, strict=False)
    _load_optimizer(optimizer, checkpoint)
    scheduler.load_state_dict(progress["scheduler"])
    if accelerator.scaler is not None and progress.get("scaler"):
        accelerator.scaler.load_state_dict(progress["scaler"])
    _load_rng(checkpoint, accelerator.process_index)
    accelerator.print(f"resumed from {checkpoint} at step {progress['step']}")
    return progress["step"], json.loads((checkpoint / HISTORY_FILE).read_text())


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings in full fine-tuning): copy the repeats."""
    seen, out = set(), {}
    for name, tensor in weights.items():
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.detach().clone() if storage in seen else tensor.detach().contiguous()
        seen.add(storage)
    return out


def _save_optimizer(optimizer, folder: Path) -> None:
    """AdamW's tensors as safetensors (``<param index>.<name>``), its groups and scalars as JSON."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.contiguous() for index, values in state["state"].items()
               for key, value in values.items() if torch.is_tensor(value)}
    scalars = {str(index): {key: value for key, value in values.items() if not torch.is_tensor(value)}
               for index, values in state["state"].items()}
    save_file(tensors, folder / OPTIMIZER_FILE)
    (folder / OPTIMIZER_LAYOUT_FILE).write_text(json.dumps({"param_groups": state["param_groups"], "state": scalars}))


def _load_optimizer(optimizer, folder: Path) -> None:
    layout = json.loads((folder / OPTIMIZER_LAYOUT_FILE).read_text())
    state = {int(index): dict(values) for index, values in layout["state"].items()}
    for name, tensor in load_file(folder / OPTIMIZER_FILE).items():
        index, key = name.split(".", 1)
        state[int(index)][key] = tensor
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(layout["param_groups"]):
        raise ValueError(f"resume: {folder} has {len(layout['param_groups'])} parameter groups, this run "
                         f"{len(current)}")
    # JSON gives lists where torch keeps tuples (betas).
    groups = [{key: tuple(value) if isinstance(now.get(key), tuple) else value for key, value in saved.items()}
              for saved, now in zip(layout["param_groups"], current, strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save_rng(folder: Path, process: int) -> None:
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    (folder / f"rng_{process}.json").write_text(json.dumps({
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached]}))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, folder / f"rng_{process}.safetensors")


def _load_rng(folder: Path, process: int) -> None:
    text = json.loads((folder / f"rng_{process}.json").read_text())
    version, internal, gauss_next = text["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached = text["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    tensors = load_file(folder / f"rng_{process}.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _save_final(accelerator: Accelerator, model, processor: VLMProcessor, config: Config,
                history: list[dict]) -> Path:
    """align: config + projector (the config names the base tower and LM). instruct: + the LoRA adapter.

    Written beside ``final/`` and swapped in: a kill leaves the old result or the new one, never half of one.
    """
    accelerator.wait_for_everyone()
    output_dir = Path(config.output_dir)
    out = output_dir / FINAL
    if accelerator.is_main_process:
        vlm: VLM = accelerator.unwrap_model(model)
        staging = output_dir / f".partial_{FINAL}"
        shutil.rmtree(staging, ignore_errors=True)
        full = config.stage == "instruct" and config.train.full_finetune
        adapter = config.stage == "instruct" and not full
        vlm.save_pretrained(staging, processor, full=full, adapter=adapter)
        if adapter:
            vlm.language_model.save_pretrained(staging / ADAPTER_DIR, save_embedding_layers=False)
        _swap_in(staging, out)
        write_atomic(output_dir / HISTORY_FILE, json.dumps(history))
        _plot_loss(history, output_dir / "loss.png")
        accelerator.print(f"saved {out}")
    accelerator.wait_for_everyone()
    return out


def _swap_in(new: Path, old: Path) -> None:
    """Replace folder ``old`` by the fully written ``new`` with renames only."""
    retired = old.with_name(f".old_{old.name}")
    shutil.rmtree(retired, ignore_errors=True)
    if old.exists():
        os.replace(old, retired)
    os.replace(new, old)
    shutil.rmtree(retired, ignore_errors=True)


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
