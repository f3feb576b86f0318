"""The demo model, from nothing, on a CPU: ``python -m tools.demo build [--out models/demo] [--work runs/demo]``.

1. data: ``vlm.synth`` panels, training seed ``TRAIN_SEED``, held-out seed ``EVAL_SEED``;
2. tokenizer + small Qwen2 LM pretrained on the corpus text (the "downloaded LLM");
3. CLIP tower trained on image-caption pairs (SigLIP loss: it taught the reading faster, see ``Budget``);
4. stage 1 (projector) and stage 2 (LoRA + projector) with the project's trainer, tower frozen;
5. merge, save in fp16 (loaded as fp32), score on held-out panels before/after each stage.

Every step's wall time and metrics go to ``<work>/recipe.json``; loss curves to ``<work>/*.png``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import multiprocessing
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from eval.answering import user_turn
from tools.demo.contrastive import (
    TowerSpec,
    evaluate_fields,
    image_processor,
    load_heads,
    save_tower,
    seed_query_projector,
    spot_targets,
    train_tower,
    zero_shot,
)
from tools.demo.lm import (
    corpus_texts,
    instruction_records,
    panel_metas,
    panel_twins,
    pretrain_lm,
    train_tokenizer,
    tune_until_it_answers,
)
from tools.demo.score import CHAT_CODE_PROMPT, score
from tools.demo.twin import TWIN_SPOTS, distil_projector, twin_accuracy, twin_token_ids, twin_vocabulary
from vlm.config import load_config
from vlm.data.cache import FeatureCache, record_image_key
from vlm.synth import write_dataset
from vlm.synth.panels import generate_panel

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# Seeds of vlm.synth datasets. Training never sees EVAL_SEED, EXAMPLE_SEED or GATE_SEED panels (the
# last are the LM's check, ``tune_until_it_answers``); the resolution probe (tools.demo.probe) used 900 and 901.
TRAIN_SEED, EVAL_SEED, EXAMPLE_SEED, GATE_SEED = 1000, 2000, 3000, 4000


@dataclass
class Budget:
    """How much of everything; ``QUICK`` is the same pipeline shrunk to a smoke test."""

    n_train: int = 20000  # the shared glyph head sees each character more often
    n_eval: int = 200
    vocab_size: int = 1024
    lm_steps: int = 1500
    lm_instruct_steps: int = 2500  # replies only: the LM learns to answer from the twin (see tools.demo.lm.instruction_records)
    lm_instruct_more_steps: int = 1000  # further rounds until it does (tools.demo.lm.tune_until_it_answers)
    # Copying the code into reports arrives after a varying number of rounds; the LM runs beside the tower:
    # rounds are cheap.
    lm_instruct_rounds: int = 6
    # The LM holds one core for most of the tower's time, so its steps are the tower's; the shortcuts tried
    # (one long round, half the pretraining) missed the gate.
    lm_long_share: float = 0.2  # reports and descriptions per question record (see tools.demo.lm.instruction_records)
    lm_hidden: int = 128
    lm_layers: int = 4
    # SigLIP's sigmoid loss taught the fact heads to read sooner than CLIP's softmax loss; zero-shot caption
    # checks were too noisy to choose by.
    tower_loss: str = "siglip"
    # The caption loss's weight beside the fields' (the reading): at 1 it dominated the step's loss and its
    # one clipped gradient and slowed the reading; at 0.2 it still learns.
    tower_contrastive_weight: float = 0.2
    # A step count, so that a slower LM beside it cannot shorten the tower's schedule; the minutes are a cap,
    # and ``tower_seconds`` ends it sooner on a slow day so the build stays within ``build_minutes``.
    tower_steps: int = 8000
    tower_minutes: float | None = 43.5
    build_minutes: float | None = 60.0
    # Batches of 16 at lr 1.4e-3: in the same images and time they read more whole codes than 32 at 2e-3.
    tower_batch: int = 16
    tower_lr: float = 1.4e-3
    # Every image whole: FLIP's patch dropping wins early on more steps but reads fewer codes by the build's
    # end, and slows the LM beside it.
    # Twice the steps distil no better on a well-trained tower; the tower, where the reading is learnt, gets
    # the minutes instead.
    distil_steps: int = 4000
    distil_panels: int | None = None  # all: stage 1 needs the tower's features of every panel anyway
    align_steps: int = 300
    instruct_steps: int = 1000
    long_answer_share: float = 0.1  # of the detailed descriptions and JSON reports kept for stage 2
    eval_limit: int | None = None


QUICK = Budget(n_train=48, n_eval=4, vocab_size=640, lm_steps=4, lm_instruct_steps=2, lm_instruct_more_steps=2,
               lm_instruct_rounds=2, lm_hidden=64, lm_layers=2, tower_steps=3, tower_minutes=None, build_minutes=None,
               tower_batch=16, distil_steps=2, align_steps=2, instruct_steps=2, long_answer_share=1.0)
# 128 px is vlm.synth's minimum and the code is still legible by eye there (glyphs ~7x10 px); 8-px patches,
# since at 16 px two code characters share a token; width 128 reads faster per second than 64.
# Two heads of 64 and exact GELU: a faster step than four heads of 32 and quick GELU, reading as well.
SPEC = TowerSpec(image_size=128, patch_size=8, width=128, layers=6, text_width=64, text_layers=2, embed_dim=64,
                 head_width=64, activation="gelu")
QUICK_SPEC = TowerSpec(image_size=128, patch_size=32, width=64, layers=1, text_width=64, text_layers=1, embed_dim=32)


# What follows the tower (distillation, both stages, evals; both cores) scales with the day's machine speed,
# which the LM's fixed-size pretraining measures first; 1.45x covers the slow days.
AFTER_TOWER_PER_PRETRAINING_SECOND = 1.45


# Stage 2 sizes itself by the clock: its step is a few times stage 1's, and around its loop come checks,
# loading, merging and saving; on a slow day it gets the steps the hour has left.
STAGE2_PER_STAGE1_STEP = 2.6
STAGE2_FIXED_SECONDS = 75.0


def stage2_steps(budget: Budget, seconds_left: float | None, stage1_history: list[dict]) -> int:
    """Stage 2's steps: the budget's, or as many as fit in ``seconds_left`` at the pace stage 1 just ran."""
    if seconds_left is None or not stage1_history:
        return budget.instruct_steps
    per_step = STAGE2_PER_STAGE1_STEP * stage1_history[-1]["seconds"] / stage1_history[-1]["step"]
    return max(1, min(budget.instruct_steps, int((seconds_left - STAGE2_FIXED_SECONDS) / per_step)))


# The LM's tuning rounds take longer than its pretraining; when they end after the tower's clock limit, the
# build would wait with a core idle, so the tower trains on until the LM's predicted end (two rules below).
LM_TUNING_PER_PRETRAINING_SECOND = 1.75
LM_ROUNDS = 5
LM_LAST_CHECK_SECONDS = 30.0  # after the last round: the held-out score from the twins, and saving


def lm_predicted_end(lm_started_at: float, pretraining_seconds: float, checks_ended_at: list[float]) -> float:
    """When the LM job will be done, in seconds from the build's start. ``checks_ended_at``: when each of
    its gate checks ended so far, the first being the check before round 1."""
    rounds = len(checks_ended_at) - 1
    if rounds < 2:  # round 1 is longer (2,500 steps against 1,000): it says little about the others
        return lm_started_at + (1 + LM_TUNING_PER_PRETRAINING_SECOND) * pretraining_seconds
    last_round = checks_ended_at[-1] - checks_ended_at[-2]
    return checks_ended_at[-1] + max(0, LM_ROUNDS - rounds) * last_round + LM_LAST_CHECK_SECONDS


def tower_seconds(budget: Budget, tower_started_at: float, pretraining_seconds: float | None,
                  lm_ends_at: float | None = None) -> float | None:
    """The tower's wall-time limit: its own cap and, once the LM's pretraining has shown how fast the
    machine runs today, the time that leaves the rest of the build inside ``budget.build_minutes``, or
    until the LM's (predicted) end if that is later: the build waits for the LM anyway.
    ``tower_started_at`` and ``lm_ends_at`` are in seconds from the start of the build."""
    limits = [60 * budget.tower_minutes] if budget.tower_minutes else []
    if budget.build_minutes and pretraining_seconds is not None:
        by_clock = 60 * budget.build_minutes - tower_started_at - AFTER_TOWER_PER_PRETRAINING_SECOND * pretraining_seconds
        if lm_ends_at is not None:
            by_clock = max(by_clock, lm_ends_at - tower_started_at)
        limits.append(by_clock)
    return min(limits, default=None)


class Recipe:
    """Runs the steps in order and records their wall time and results in ``recipe.json`` as it goes."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.record: dict = {"steps": {}, "metrics": {}}
        self.started = time.perf_counter()

    @contextmanager
    def step(self, name: str):
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        yield
        self.record["steps"][name] = round(time.perf_counter() - started, 1)
        self.save()

    def save(self) -> None:
        self.record["total_seconds"] = round(time.perf_counter() - self.started, 1)
        (self.work / "recipe.json").write_text(json.dumps(self.record, indent=2) + "\n")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing large blocks back to the OS at once.

    By default every block above the (at most 32 MB) mmap threshold is unmapped when freed, so each
    training step's activations fault their pages in again. The process then holds on to its peak
    memory, which is what a training loop reuses anyway. Returns whether it took effect (not glibc:
    nothing happens).
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> numbers
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def plot(history: list[dict], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    for key in keys:
        axis.plot([h["step"] for h in history], [h[key] for h in history], linewidth=1.2, label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def panel_targets(metas: list[dict], spec: TowerSpec) -> torch.Tensor:
    """``spot_targets`` of each panel: panels are written at the tower's size, so layout pixels are its pixels."""
    grid = spec.image_size // spec.patch_size
    return torch.tensor([spot_targets(m["report"], m["camera"]["layout"], spec.patch_size, grid) for m in metas])


def load_panels(data_dir: Path, spec: TowerSpec,
                limit: int | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor, list[dict]]:
    """Pixels (through the tower's own image processor), stage-1 captions, field targets and reports of the
    first ``limit`` panels."""
    metas = panel_metas(data_dir, limit)
    captions = {c["id"]: c["conversations"][-1]["value"] for c in json.loads((data_dir / "captions.json").read_text())}
    processor = image_processor(spec)
    chunks = []
    for start in tqdm(range(0, len(metas), 256), desc="pixels", unit="chunk"):
        images = [Image.open(data_dir / m["image"]).convert("RGB") for m in metas[start:start + 256]]
        chunks.append(processor(images, return_tensors="pt")["pixel_values"])
    return (torch.cat(chunks), [captions[m["id"]] for m in metas], panel_targets(metas, spec),
            [m["report"] for m in metas])


def panel_features(model, processor, data_dir: Path, spec: TowerSpec, cache_root: Path,
                   limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen tower's features of a synth folder's first ``limit`` panels (fp16, to halve their
    memory) and their ``spot_targets``.

    They go through the trainer's feature cache, filled here for every panel of the folder: stage 1 then
    finds it full instead of running the tower over the panels a second time.
    """
    metas = panel_metas(data_dir)
    keys = [record_image_key(m["image"], data_dir) for m in metas]
    cache = FeatureCache.build(model, processor, dict(zip(keys, (m["image"] for m in metas), strict=True)), data_dir,
                               cache_root, batch_size=100)
    features = torch.stack([cache[key].half() for key in tqdm(keys[:limit], desc="cached features", unit="panel")])
    return features, panel_targets(metas[:limit], spec)


def stage2_records(data_dir: Path, share: float, seed: int, count: int | None = None) -> Path:
    """Stage-2 mixture: every all-questions and dialogue record, ``share`` of the long ones; then the
    ``count`` of them the stage draws (see ``drawn_records``).

    The all-questions records ask every category about one image (short answers): per image-token
    forward they carry 3x the answers of the two-question ones (which they make redundant). Detailed
    descriptions and JSON reports are 3-5x longer than the rest; on a CPU budget they would take most
    of the steps while the short answers carry most of the facts.
    """
    records = json.loads((data_dir / "instruct.json").read_text())
    rng = random.Random(seed)
    kept = [r for r in records if r["id"].endswith(("_all", "_chat")) or
            (not r["id"].endswith("_qa") and rng.random() < share)]
    return drawn_records(kept, count, seed, data_dir / "stage2.json")


def drawn_records(records: list[dict], count: int | None, seed: int, path: Path) -> Path:
    """Write the ``count`` records (a random choice; all when there are fewer) that a stage of ``count``
    samples draws, and return the file.

    The trainer checks every record of its file before the first step and hashes every image for the
    feature cache: over the full stage-2 mixture that costs several times what the records a stage draws
    in one pass need. A random choice of them is what the shuffled sampler would have drawn.
    """
    if count is not None and count < len(records):
        records = random.Random(seed).sample(records, count)
    path.write_text(json.dumps(records) + "\n")
    return path


def samples_drawn(stage_config: str, steps: int) -> int:
    """How many samples ``steps`` steps of a demo stage take (one process, no accumulation)."""
    train = load_config(CONFIGS / stage_config).train
    return steps * train.batch_size * train.grad_accum


def save_fp16(model, processor, out: Path) -> None:
    """Weights in fp16 (half the bytes); the config keeps dtype float32, so loading casts them back up."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.float16).save_pretrained(staging, processor, full=True)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def keep_text_tower(tower: Path, tokenizer_dir: Path, vision_dir: Path) -> None:
    """Make the saved model's ``vision_tower`` the whole CLIPModel, so that ``python -m vlm.zeroshot`` can score
    labels with its text half; the VLM still reads only the vision half (``vlm.vision.load_vision_encoder``).

    The vision weights stay the saved VLM's own (fp16); the text half is ``tower``'s, with the tokenizer it was
    trained on, made to end each text with eos as ``contrastive.tokenize_captions`` did (the text half pools there).
    """
    from tokenizers import processors
    from transformers import CLIPModel

    from vlm.loading import load_complete
    from vlm.vision import load_vision_encoder
    from vlm.zeroshot import SETTINGS_FILE

    whole = load_complete(CLIPModel.from_pretrained, tower, dtype=torch.float32)
    encoder = load_complete(load_vision_encoder, str(vision_dir))
    whole.vision_model.load_state_dict(getattr(encoder, "vision_model", encoder).state_dict())  # nested or not
    del encoder  # its tensors may map the file about to be rewritten
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    if len(tokenizer) > whole.config.text_config.vocab_size:
        raise ValueError(f"{tokenizer_dir} holds {len(tokenizer)} tokens, the text tower of {tower} only "
                         f"{whole.config.text_config.vocab_size}: not the tokenizer it was trained with")
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tokenizer.eos_token_id)])
    tokenizer.padding_side = "right"
    whole.to(torch.float16).save_pretrained(vision_dir)
    tokenizer.save_pretrained(vision_dir)
    if (tower / SETTINGS_FILE).is_file():  # how it scores (SigLIP's loss: sigmoid and its bias), where the tower says
        shutil.copy(tower / SETTINGS_FILE, vision_dir / SETTINGS_FILE)


def folder_megabytes(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)


def data_folders(work: Path) -> tuple[Path, Path, Path]:
    """A build's synth folders: training panels, held-out eval panels, the LM's gate panels."""
    return work / "data" / "train", work / "data" / "eval", work / "data" / "lm_gate"


def _lm_job(work: Path, budget: Budget, threads: int, instruct: bool) -> dict:
    """Pretraining, or instruction tuning until it answers from the twin: how an instruct LLM is made.
    The tuning writes the wall time of each gate check to ``lm_checks.json`` (the tower's clock reads it)."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "lm")
    if instruct:
        checks: list[float] = []

        def note_check(_: dict) -> None:
            checks.append(time.time())
            (work / "lm_checks.json.part").write_text(json.dumps(checks))
            (work / "lm_checks.json.part").replace(work / "lm_checks.json")  # never read half-written
        return _instruct_lm(work, tokenizer, budget, rounds_done=0, on_check=note_check) | {"ended_at": time.time()}
    return pretrain_lm(corpus_texts(data_folders(work)[0], tokenizer), tokenizer, work / "lm", steps=budget.lm_steps,
                       hidden_size=budget.lm_hidden, layers=budget.lm_layers)


def _instruct_lm(work: Path, tokenizer, budget: Budget, rounds_done: int,
                 on_check: Callable[[dict], None] | None = None) -> dict:
    train_dir, eval_dir, gate_dir = data_folders(work)
    records = instruction_records(train_dir, budget.lm_long_share, TRAIN_SEED)
    rounds = tune_until_it_answers(train_dir, records, tokenizer, work / "lm", gate_dir, budget.lm_instruct_steps,
                                   budget.lm_instruct_more_steps, budget.lm_instruct_rounds, rounds_done=rounds_done,
                                   on_check=on_check)
    model = AutoModelForCausalLM.from_pretrained(work / "lm")
    return {"instruction_rounds": rounds,
            "held_out_from_true_twins": score(model, tokenizer, eval_dir, budget.eval_limit, twins=panel_twins(eval_dir))}


def build(out: Path, work: Path, quick: bool = False, example: Path | None = None) -> dict:
    budget, spec = (QUICK, QUICK_SPEC) if quick else (Budget(), SPEC)
    work.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    recipe = Recipe(work)
    recipe.record.update(budget=asdict(budget), tower=asdict(spec),
                         seeds={"train": TRAIN_SEED, "eval": EVAL_SEED, "example": EXAMPLE_SEED,
                                "lm_gate": GATE_SEED})
    metrics = recipe.record["metrics"]
    train_dir, eval_dir, gate_dir = data_folders(work)

    with recipe.step("data"):
        write_dataset(train_dir, budget.n_train, TRAIN_SEED, spec.image_size, workers=torch.get_num_threads())
        write_dataset(eval_dir, budget.n_eval, EVAL_SEED, spec.image_size)
        write_dataset(gate_dir, budget.n_eval, GATE_SEED, spec.image_size)
        drawn_records(json.loads((train_dir / "captions.json").read_text()),
                      samples_drawn("demo-align.yaml", budget.align_steps), TRAIN_SEED, train_dir / "stage1.json")
        stage2_records(train_dir, budget.long_answer_share, TRAIN_SEED,
                       samples_drawn("demo-instruct.yaml", budget.instruct_steps))

    with recipe.step("tokenizer"):
        tokenizer = train_tokenizer(corpus_texts(train_dir), work / "lm", budget.vocab_size)

    # The LM needs nothing from the tower's step: it runs in its own process on its share of the cores;
    # the tower takes them all back once the LM is done.
    cores = torch.get_num_threads()
    share = max(1, cores // 2)
    torch.set_num_threads(share)
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    lm_started_at = time.perf_counter() - recipe.started
    build_started_on_wall_clock = time.time() - lm_started_at  # the LM's process reports wall times
    (work / "lm_checks.json").unlink(missing_ok=True)
    pretraining = pool.submit(_lm_job, work, budget, share, instruct=False)
    lm_job = pool.submit(_lm_job, work, budget, share, instruct=True)  # the same worker, once pretraining is done

    def all_cores_once_lm_is_done() -> None:
        if lm_job.done() and torch.get_num_threads() < cores:
            torch.set_num_threads(cores)
    with recipe.step("pixels"):
        (pixels, captions, targets, _), (eval_pixels, _, eval_targets, eval_reports) = \
            load_panels(train_dir, spec), load_panels(eval_dir, spec)

    with recipe.step("tower"):
        loss, tower_started_at = budget.tower_loss, time.perf_counter() - recipe.started

        def lm_ends_at() -> float:
            if lm_job.done():
                return lm_job.result()["ended_at"] - build_started_on_wall_clock
            checks = work / "lm_checks.json"
            checks_ended_at = [t - build_started_on_wall_clock for t in json.loads(checks.read_text())] if checks.exists() else []
            return lm_predicted_end(lm_started_at, pretraining.result()["seconds"], checks_ended_at)

        def seconds_allowed() -> float | None:
            if not pretraining.done():
                return tower_seconds(budget, tower_started_at, None)
            return tower_seconds(budget, tower_started_at, pretraining.result()["seconds"], lm_ends_at())
        model, history = train_tower(pixels, captions, targets, tokenizer, spec, loss=loss, steps=budget.tower_steps,
                                     max_seconds=seconds_allowed, batch_size=budget.tower_batch,
                                     lr=budget.tower_lr, contrastive_weight=budget.tower_contrastive_weight,
                                     desc=f"tower {loss}", held_out=(eval_pixels, eval_targets),
                                     eval_every=8000 // budget.tower_batch,  # held-out every 8,000 images
                                     before_step=all_cores_once_lm_is_done)
        plot(history, ["loss", "contrastive", "fields"], work / "loss_tower.png", f"tower ({loss} + caption fields)")
        metrics["tower"] = {"loss": loss, "steps": len(history), "images_seen": len(history) * budget.tower_batch,
                            "seconds_allowed": seconds_allowed(),
                            "held_out_curve": [{"step": h["step"], **h["held_out"]} for h in history if "held_out" in h],
                            "zero_shot": zero_shot(model.clip, tokenizer, eval_pixels, eval_reports),
                            "field_heads_heldout": evaluate_fields(model, eval_pixels, eval_targets)}
        save_tower(model, spec, work / "tower")
        heads = model.heads
        del model, pixels

    with recipe.step("language_model_wait"):  # pretraining ran beside the tower; its own time is in metrics
        result = pretraining.result() | {k: v for k, v in lm_job.result().items() if k != "ended_at"}
        pool.shutdown()
        torch.set_num_threads(cores)
        plot(result["history"], ["loss"], work / "loss_lm.png", "LM pretraining on the corpus text")
        metrics["language_model"] = {k: v for k, v in result.items() if k != "history"} | {
            "final_loss": sum(h["loss"] for h in result["history"][-20:]) / len(result["history"][-20:])}

    deadline = recipe.started + 60 * budget.build_minutes if budget.build_minutes else None
    run_stages(recipe, out, budget, spec, heads, example, deadline)
    recipe.save()
    return recipe.record


def run_stages(recipe: Recipe, out: Path, budget: Budget, spec: TowerSpec, heads, example: Path | None,
               deadline: float | None = None) -> None:
    """Seed the projector, stage 1, stage 2, merge and save, with the held-out scores before and after.
    ``deadline`` (``time.perf_counter()`` seconds) is when the build must be done: stage 2 fits its steps to it."""
    from vlm.loading import build_vlm, load_pretrained
    from vlm.merge import merge
    from vlm.train.loop import train

    work, metrics = recipe.work, recipe.record["metrics"]
    train_dir, eval_dir, _ = data_folders(work)
    paths = [f"model.vision_tower={work / 'tower'}", f"model.language_model={work / 'lm'}",
             f"data.image_folder={train_dir}", f"data.cache_dir={work / 'feature_cache'}"]
    with recipe.step("distil_projector"):
        torch.manual_seed(0)
        model, processor = build_vlm(load_config(CONFIGS / "demo-align.yaml", paths).model)
        seed_query_projector(model.projector, heads, TWIN_SPOTS)
        cache_root = work / "feature_cache"
        features, targets = panel_features(model, processor, train_dir, spec, cache_root, budget.distil_panels)
        eval_features, eval_targets = panel_features(model, processor, eval_dir, spec, cache_root)
        embeddings = model.language_model.get_input_embeddings().weight.detach()
        vocabulary = twin_vocabulary(processor.tokenizer)
        twins, eval_twins = (twin_token_ids(processor.tokenizer, t) for t in (targets, eval_targets))
        history = distil_projector(model.projector, features, twins, embeddings, vocabulary, budget.distil_steps)
        del features
        plot(history, ["loss", "which", "distance"], work / "loss_distil.png", "projector distilled to the twin")
        metrics["distil_projector"] = {"steps": len(history), "seconds": history[-1]["seconds"],
                                       "held_out": twin_accuracy(model.projector, eval_features, eval_twins,
                                                                 embeddings, vocabulary)}
        model.save_pretrained(work / "init", processor, full=False)  # stage 1 starts here
    with recipe.step("eval_before_stage1"):
        metrics["before_stage1"] = score(model, processor, eval_dir, budget.eval_limit, desc="eval before stage 1",
                                         answers_file=work / "answers_before_stage1.jsonl")

    with recipe.step("stage1_align"):
        stage1 = train(load_config(CONFIGS / "demo-align.yaml", paths + [
            f"data.path={train_dir / 'stage1.json'}", f"output_dir={work / 'align'}", f"init_from={work / 'init'}",
            f"train.max_steps={budget.align_steps}"]))
    with recipe.step("eval_after_stage1"):
        model, processor = load_pretrained(stage1)
        metrics["after_stage1"] = score(model, processor, eval_dir, budget.eval_limit, desc="eval after stage 1",
                                        answers_file=work / "answers_after_stage1.jsonl")

    with recipe.step("stage2_instruct"):
        stage1_history = json.loads((stage1.parent / "history.json").read_text())
        steps = stage2_steps(budget, deadline - time.perf_counter() if deadline else None, stage1_history)
        metrics["stage2"] = {"steps": steps, "budget_steps": budget.instruct_steps,
                             "stage1_seconds_per_step": stage1_history[-1]["seconds"] / stage1_history[-1]["step"]}
        stage2 = train(load_config(CONFIGS / "demo-instruct.yaml", paths + [
            f"data.path={train_dir / 'stage2.json'}", f"output_dir={work / 'instruct'}", f"init_from={stage1}",
            f"train.max_steps={steps}"]))

    with recipe.step("merge_and_save"):
        merge(str(stage2), str(work / "merged"))
        model, processor = load_pretrained(work / "merged")
        save_fp16(model, processor, out)
        keep_text_tower(work / "tower", work / "lm", out / "vision_tower")
        metrics["model_megabytes"] = folder_megabytes(out)

    with recipe.step("eval_after_stage2"):
        model, processor = load_pretrained(out)  # exactly what a user loads: fp16 files, fp32 on the CPU
        metrics["after_stage2"] = score(model, processor, eval_dir, budget.eval_limit, desc="eval after stage 2",
                                        answers_file=work / "answers_after_stage2.jsonl")
        if example is not None:
            image, truth = generate_panel(EXAMPLE_SEED, 0, spec.image_size)
            example.parent.mkdir(parents=True, exist_ok=True)
            image.save(example, format="JPEG", quality=95)
            prompt = processor.apply_chat_template(user_turn(processor.image_token, CHAT_CODE_PROMPT))
            inputs = processor(images=[example], text=[prompt], return_tensors="pt")
            answer = model.generate(**inputs, max_new_tokens=16, do_sample=False,
                                    pad_token_id=processor.tokenizer.pad_token_id)
            metrics["example"] = {"path": str(example), "truth": truth["asset_code"],
                                  "answer": processor.batch_decode(answer[:, inputs["input_ids"].shape[1]:])[0]}


def stages(out: Path, work: Path, example: Path | None = None) -> dict:
    """Rerun a build's last part from its work folder: the LM's instruction rounds where it does not pass
    its gate yet, then ``run_stages``. Data, tokenizer, LM pretraining and the tower are taken as the build left them."""
    keep_freed_memory()
    recipe = Recipe(work)
    recipe.record = json.loads((work / "recipe.json").read_text())
    recipe.record.setdefault("reruns", []).append({"after": dict(recipe.record["steps"])})
    budget, spec = Budget(**recipe.record["budget"]), TowerSpec(**recipe.record["tower"])
    metrics = recipe.record["metrics"]
    with recipe.step("language_model_more_rounds"):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "lm")
        done = sum(1 for r in metrics["language_model"].get("instruction_rounds", []) if r["steps"])
        more = _instruct_lm(work, tokenizer, budget, rounds_done=done)
        metrics["language_model"]["instruction_rounds"] += more.pop("instruction_rounds")[1:]
        metrics["language_model"].update(more)
    run_stages(recipe, out, budget, spec, load_heads(work / "tower", spec.width), example)
    recipe.save()
    return recipe.record
