"""``python benchmarks/run.py``: the project against Hugging Face Llava on the same weights, in one process.

Every figure is a ratio against a baseline measured in the same run, repeat by repeat (the two sides
alternate and swap who goes first, so a neighbour's load hits both); the table shows the median ratio
and its min-max spread, and the same goes to JSON (``--out``) and a PNG beside it. On a shared machine
use ``--threads 1 --clock cpu``. ``--quick`` runs everything on tiny parts in
seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import json
import operator
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project is one level up

from vlm import ModelConfig, build_vlm, load_config, load_pretrained  # noqa: E402
from vlm.hf_llava import export_llava  # noqa: E402
from vlm.model import VLM  # noqa: E402
from vlm.processor import VLMProcessor  # noqa: E402
from vlm.projector import build_projector, projected_tokens  # noqa: E402
from vlm.session import ChatSession  # noqa: E402
from vlm.testing import real_size_parts, tiny_lm, tiny_tower  # noqa: E402
from vlm.train import loop  # noqa: E402

QUESTIONS = ["what is the asset code ?", "is the fault lamp on ?", "what does the gauge read ?",
             "describe the image in detail .", "is there a crack near the top left corner ?",
             "what is the severity ?", "what is the recommended action ?", "is the run lamp off ?"]
BANDWIDTH_CONVENTION = ("floor tokens/s = bytes READ per second (a large tensor copy, its writes not counted) / "
                        "bytes read per decoded token (every LM weight once - the input embedding table only "
                        "when tied to lm_head, else one row - plus the K and V of every layer at the mean "
                        "decode context)")
LLAVA_LABELS = ("vlm.VLM.generate", "LlavaForConditionalGeneration.generate")
GROUPS = ("first_turn", "second_turn", "token_cut", "batched_eval", "training", "bf16")  # rows of --out
ALL_GROUPS = (*GROUPS, "data")  # data (benchmarks/data.py, into data_results.json beside --out): only when named
DEMO_PROJECTOR = load_config(ROOT / "configs" / "demo-align.yaml").model.projector
MEMORY_CONVENTION = ("peak RSS of the call (Linux VmHWM, reset through /proc/self/clear_refs after malloc_trim "
                     "before it) minus the RSS before it: working memory beyond the weights already loaded")


@dataclasses.dataclass
class Settings:
    quick: bool
    repeats: int
    threads: int
    new_tokens: int  # decoded per generation, forced (min_new_tokens) so both sides decode as many
    eval_tokens: int
    train_samples: int
    train_batch: int
    bf16: str  # auto | on | off
    clock: str  # wall | cpu
    workdir: Path


Clock = Callable[[], float]


# ---- measuring ------------------------------------------------------------------------------------
class TokenClock(BaseStreamer):
    """Records when generate hands over each new token (its first ``put`` is the prompt)."""

    def __init__(self, now: Clock) -> None:
        self.now = now
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(self.now())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class PeakMemory:
    """Peak resident memory of a block, in MB above what was resident before it."""

    def __init__(self) -> None:
        self.method = "VmHWM" if _reset_peak() else "ru_maxrss (lifetime peak)"

    @contextmanager
    def measure(self, into: dict):
        _return_free_memory()
        _reset_peak()
        before = _rss_kb()
        yield
        into["extra_mb"] = (_peak_kb() - before) / 1024


def _return_free_memory() -> None:
    """Hand memory freed earlier back to the OS, so the next block's peak counts what it allocates itself."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may then undercount reused memory
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_kb() -> int:
    return _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kb() -> int:
    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired(project: Callable[[], dict], baseline: Callable[[], dict], repeats: int, memory: PeakMemory,
           warmup: bool = False, before_each: Callable[[], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Alternate the two sides ``repeats`` times, swapping which goes first; ``warmup``: one untimed call each."""
    if warmup:
        project(), baseline()
    ours, theirs = [], []
    for repeat in range(repeats):
        if before_each is not None:
            before_each()
        order = ((project, ours), (baseline, theirs))
        for run, results in order if repeat % 2 == 0 else order[::-1]:
            record: dict = {}
            with memory.measure(record):
                record.update(run())
            results.append(record)
    return ours, theirs


@dataclasses.dataclass
class Row:
    name: str
    unit: str
    project: str  # what each side is
    baseline: str
    values: tuple[list[float], list[float]] = ((), ())
    memory: tuple[list[float], list[float]] = ((), ())
    target: tuple[str, float] | None = None
    note: str = ""
    skipped: str = ""

    def as_dict(self) -> dict:
        out = {"name": self.name, "unit": self.unit, "project": self.project, "baseline": self.baseline,
               "note": self.note}
        if self.skipped:
            return {**out, "skipped": self.skipped, "passed": None,
                    "target": None if self.target is None else " ".join(map(str, self.target))}
        ours, theirs = self.values
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        ratio = spread(ratios)
        passed = None if self.target is None else _OPS[self.target[0]](ratio["median"], self.target[1])
        return {**out, "project_value": spread(list(ours)), "baseline_value": spread(list(theirs)),
                "ratio": ratio, "target": None if self.target is None else f"{self.target[0]} {self.target[1]}",
                "passed": passed, "project_extra_mb": spread(list(self.memory[0])) if self.memory[0] else None,
                "baseline_extra_mb": spread(list(self.memory[1])) if self.memory[1] else None}


_OPS = {"<=": operator.le, ">=": operator.ge}


def row_from(name: str, unit: str, key: str, sides: tuple[list[dict], list[dict]], labels: tuple[str, str],
             target: tuple[str, float] | None = None, note: str = "") -> Row:
    ours, theirs = sides
    return Row(name, unit, *labels, values=([r[key] for r in ours], [r[key] for r in theirs]),
               memory=([r["extra_mb"] for r in ours if "extra_mb" in r],
                       [r["extra_mb"] for r in theirs if "extra_mb" in r]), target=target, note=note)


# ---- models -------------------------------------------------------------------------------------
def prepare_models(settings: Settings) -> tuple[Path, Path]:
    """A project folder and its Hugging Face Llava export, built once and reused from ``workdir``."""
    work = settings.workdir
    project_dir, llava_dir = work / "project", work / "llava"
    if (project_dir / "config.json").is_file() and (llava_dir / "config.json").is_file():
        return project_dir, llava_dir
    if settings.quick:
        tower, lm = tiny_tower(work / "parts" / "clip", "clip"), tiny_lm(work / "parts" / "qwen2", "qwen2")
    else:
        tower, lm = real_size_parts(work / "parts")
    model, processor = build_vlm(ModelConfig(vision_tower=str(tower), language_model=str(lm)))
    _keep_to_tokenizer(model, len(processor.tokenizer))
    model.save_pretrained(project_dir, processor)
    export_llava(model, processor, llava_dir)
    return project_dir, llava_dir


def _keep_to_tokenizer(model: VLM, vocab: int) -> None:
    """Zero the embedding rows the local tokenizer cannot write (random weights, any values are as fast).

    The real-size LM keeps Qwen's 151,936-row table while the tokenizer built here has a few hundred
    tokens; greedy decoding of ids the tokenizer cannot decode would make a chat re-render differently
    from its cache. A zero row has logit 0, below the best of hundreds of random logits.
    """
    with torch.no_grad():
        for module in (model.language_model.get_input_embeddings(), model.language_model.get_output_embeddings()):
            module.weight[vocab:] = 0


def with_projector(model: VLM, processor: VLMProcessor, kind: str) -> tuple[VLM, VLMProcessor]:
    """The same tower and LM (shared, not copied) behind another projector, e.g. the 4x token cut."""
    tower = model.vision_tower
    queries = model.config.projector_queries
    tokens = projected_tokens(kind, tower.tokens_per_image(model.config.image_size), queries)
    config = dataclasses.replace(model.config, projector=kind, tokens_per_image=tokens)
    torch.manual_seed(0)
    projector = build_projector(kind, tower.hidden_size, model.language_model.config.hidden_size, queries)
    projector = projector.to(model.projector_dtype)
    return (VLM(config, tower, projector, model.language_model),
            VLMProcessor(processor.tokenizer, processor.image_processor, tokens, config.image_token,
                         config.image_size, config.image_aspect))


def pictures(count: int, size: int = 336) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(5)
    return [Image.fromarray(torch.randint(0, 256, (size, size + 16 * i, 3), generator=generator,
                                          dtype=torch.uint8).numpy()) for i in range(count)]


def prompt_inputs(processor: VLMProcessor, images: list[Image.Image], questions: list[str]) -> dict:
    texts = [processor.apply_chat_template([{"role": "user", "content": f"<image>\n{q}"}]) for q in questions]
    return dict(processor(images=images, text=texts, return_tensors="pt"))


# ---- one generation, timed ------------------------------------------------------------------------
def timed_generate(generate: Callable, inputs: dict, new_tokens: int, pad_token_id: int, now: Clock) -> dict:
    """Time to first token and decode tokens/s of one greedy generation of exactly ``new_tokens``."""
    clock = TokenClock(now)
    start = now()
    output = generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      streamer=clock, pad_token_id=pad_token_id)
    ttft = clock.times[0] - start
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]) if len(clock.times) > 1 else float("nan")
    return {"ttft": ttft, "decode_tps": decode, "tokens": output[0, -new_tokens:].tolist()}


@contextmanager
def first_call_times(modules: dict[str, torch.nn.Module], into: dict, now: Clock):
    """Time (by ``now``) of each module's first call inside the block: for generate, its prefill."""
    starts: dict[str, float] = {}
    handles = []
    for name, module in modules.items():
        def before(*_, name=name):
            starts.setdefault(name, now())

        def after(*_, name=name):
            into.setdefault(name, now() - starts[name])

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def read_bandwidth(megabytes: int, now: Clock) -> float:
    """Bytes read per second by a copy between two tensors far larger than the caches (median of 3)."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # fault the pages in before timing
    times = []
    for _ in range(3):
        start = now()
        target.copy_(source)
        times.append(now() - start)
    return source.numel() * source.element_size() / statistics.median(times)


def decode_bytes_per_token(model: VLM, context: float) -> float:
    llm = model.language_model
    embed, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in llm.parameters()}
    if embed.data_ptr() != head.data_ptr():  # untied: the lookup reads one row, not the table
        weights[embed.data_ptr()] = embed.shape[1] * embed.element_size()
    config = llm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * embed.element_size()
    return sum(weights.values()) + kv


def matmul_gflops(dtype: torch.dtype, size: int = 512, reps: int = 5) -> float:
    """The best of ``reps`` timed matmuls: a probe of what the CPU can do, not of what a neighbour left it."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ---- training -------------------------------------------------------------------------------------
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


def second_epoch_rate(overrides: list[str], now: Clock) -> float:
    """Samples/s of ``train`` from the end of its first epoch to its last step (wall time between steps)."""
    stamps: list[tuple[float, int]] = []
    step = loop._optimizer_step

    def timed_step(*args, **kwargs):
        result = step(*args, **kwargs)
        stamps.append((now(), result[1]))
        return result

    with mock.patch.object(loop, "_optimizer_step", timed_step):
        loop.train(load_config(None, overrides))
    second = stamps[len(stamps) // 2 - 1:]  # two epochs: from the last step of the first
    return sum(samples for _, samples in second[1:]) / (second[-1][0] - second[0][0])


# ---- the rows -------------------------------------------------------------------------------------
class Suite:
    def __init__(self, settings: Settings, project_dir: Path, llava_dir: Path) -> None:
        self.settings = settings
        self.memory = PeakMemory()
        # CPU time counts only what this process ran: on a shared machine it leaves out the neighbours' turns.
        self.now: Clock = time.process_time if settings.clock == "cpu" else time.perf_counter
        self.model, self.processor = load_pretrained(project_dir)
        self.llava = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
        self.llava_processor = AutoProcessor.from_pretrained(llava_dir, backend="pil")
        self.pad = self.processor.tokenizer.pad_token_id
        self.image = pictures(1)[0]
        self.rows: list[Row] = []
        self.facts: dict = {
            "attention": {"project_lm": self.model.language_model.config._attn_implementation,
                          "project_tower": self.model.vision_tower.encoder.config._attn_implementation,
                          "llava": self.llava.config.text_config._attn_implementation},
            "tokens_per_image": self.model.config.tokens_per_image,
            "weights_mb": {"project": _weights_mb(self.model), "llava": _weights_mb(self.llava)},
        }

    def _against_llava(self, inputs: dict, **paired_kwargs) -> tuple[list[dict], list[dict]]:
        """The same greedy generation from both models, with the prefill split into tower, decoder and lm_head."""
        ours, llava = self.model, self.llava
        runs = paired(
            self._generation(ours.generate, inputs, {"tower": ours.vision_tower, "decoder":
                             ours.language_model.get_decoder(), "lm_head": ours.language_model.lm_head}),
            self._generation(llava.generate, inputs, {"tower": llava.model.vision_tower, "decoder":
                             llava.model.language_model, "lm_head": llava.lm_head}),
            self.settings.repeats, self.memory, warmup=True, **paired_kwargs)
        dtype = str(ours.projector_dtype).removeprefix("torch.")
        self.facts[f"first_turn_split_s_{dtype}"] = {
            side: {key: statistics.median(r[key] for r in results) for key in ("tower", "decoder", "lm_head", "ttft")}
            for side, results in zip(("project", "llava"), runs, strict=True)}
        return runs

    def first_turn(self) -> None:
        """Same prompt, same tensors, same number of greedy tokens; plus the bandwidth floor for decode."""
        s = self.settings
        inputs = prompt_inputs(self.processor, [self.image], [QUESTIONS[0]])
        bandwidth: list[float] = []
        runs = self._against_llava(inputs, before_each=lambda: bandwidth.append(
            read_bandwidth(64 if s.quick else 1024, self.now)))
        same = all(a["tokens"] == b["tokens"] for a, b in zip(*runs, strict=True))
        self.rows.append(row_from("first-turn time to first token", "s", "ttft", runs, LLAVA_LABELS, ("<=", 1.0),
                                  note=f"prompt {inputs['input_ids'].shape[1]} tokens"))
        self.rows.append(row_from("decode tokens/s", "tok/s", "decode_tps", runs, LLAVA_LABELS, (">=", 1.0),
                                  note=f"{s.new_tokens} greedy tokens, identical: {same}"))
        self.facts["project_decode_tps_float32"] = statistics.median(r["decode_tps"] for r in runs[0])
        context = inputs["input_ids"].shape[1] + s.new_tokens / 2
        per_token = decode_bytes_per_token(self.model, context)
        self.facts.update(read_bandwidth_gb_s=spread([b / 1e9 for b in bandwidth]),
                          decode_bytes_per_token_mb=per_token / 2**20, greedy_tokens_identical=same)
        floors = [b / per_token for b in bandwidth]
        self.rows.append(Row("decode vs memory-bandwidth floor", "tok/s", "vlm decode", "bandwidth floor",
                             values=([r["decode_tps"] for r in runs[0]], floors), target=(">=", 0.6),
                             note=f"{per_token / 2**20:.0f} MB read per token"))

    def _generation(self, generate: Callable, inputs: dict, modules: dict[str, torch.nn.Module],
                    new_tokens: int | None = None) -> Callable[[], dict]:
        """One timed greedy generation, with the wall or CPU time of each module's prefill call."""
        def run() -> dict:
            stages: dict = {}
            with first_call_times(modules, stages, self.now):
                result = timed_generate(generate, inputs, new_tokens or self.settings.new_tokens, self.pad, self.now)
            return {**stages, **result}
        return run

    def _second_turn(self, model: VLM, processor: VLMProcessor, reencode: Callable[[dict], object],
                     reencode_processor) -> tuple[list[dict], list[dict]]:
        """The session's second turn (cache reused) against encoding image and whole conversation again."""
        session = ChatSession(model, processor, self.image, max_new_tokens=self.settings.new_tokens)
        session.ask(QUESTIONS[0])
        forks: list[ChatSession] = []

        def ours() -> dict:
            fork = copy.copy(session)  # the session after turn one, its cache copied so every repeat is alike
            fork.messages, fork.cache, fork.max_new_tokens = list(session.messages), copy.deepcopy(session.cache), 1
            start = self.now()
            fork.ask(QUESTIONS[1])
            forks.append(fork)
            return {"ttft": self.now() - start}

        ours()
        conversation = forks[-1].messages[:-1]  # both turns' questions and the first answer
        text = reencode_processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = dict(reencode_processor(images=[self.image], text=[text], return_tensors="pt"))

        def theirs() -> dict:
            start = self.now()
            reencode(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=self.pad)
            return {"ttft": self.now() - start}

        runs = paired(ours, theirs, self.settings.repeats, self.memory)
        if any(fork.full_reencodes for fork in forks):
            raise RuntimeError("the chat session fell back to re-encoding: the second-turn figure would be wrong")
        self.facts.setdefault("second_turn_prompt_tokens", []).append(inputs["input_ids"].shape[1])
        return runs

    def second_turn(self) -> None:
        runs = self._second_turn(self.model, self.processor, self.llava.generate, self.llava_processor)
        self.rows.append(row_from("second-turn time to first token", "s", "ttft", runs,
                                  ("ChatSession (KV cache kept)", "Llava re-encodes image + conversation"),
                                  ("<=", 0.1)))

    def token_cut(self) -> None:
        """merge2x2_mlp against mlp2x_gelu on the same tower and LM: the LLM's prefill and the whole TTFT."""
        cut, cut_processor = with_projector(self.model, self.processor, "merge2x2_mlp")
        s = self.settings

        def prefill(model: VLM, processor: VLMProcessor) -> Callable[[], dict]:
            inputs = prompt_inputs(processor, [self.image], [QUESTIONS[0]])
            return self._generation(model.generate, inputs, {"tower": model.vision_tower,
                                                             "llm": model.language_model}, new_tokens=1)

        runs = paired(prefill(cut, cut_processor), prefill(self.model, self.processor), s.repeats, self.memory)
        labels = (f"merge2x2_mlp ({cut.config.tokens_per_image} tokens)",
                  f"mlp2x_gelu ({self.model.config.tokens_per_image} tokens)")
        self.rows.append(row_from("4x token cut: LLM prefill", "s", "llm", runs, labels, ("<=", 0.35)))
        tower_share = statistics.median(r["tower"] / r["ttft"] for r in runs[0])
        self.facts["token_cut_split_s"] = {
            name: {key: statistics.median(r[key] for r in results) for key in ("tower", "llm", "ttft")}
            for name, results in zip(("merge2x2_mlp", "mlp2x_gelu"), runs, strict=True)}
        self.rows.append(row_from("4x token cut: first-turn time to first token", "s", "ttft", runs, labels,
                                  note=f"the tower is {tower_share:.0%} of it and does not shrink"))
        runs = self._second_turn(cut, cut_processor, cut.generate, cut_processor)
        self.rows.append(row_from("4x token cut: second-turn time to first token", "s", "ttft", runs,
                                  ("ChatSession (KV cache kept)", "re-encoding image + conversation"),
                                  ("<=", 0.1)))

    def batched_eval(self) -> None:
        """A batch of 8 questions (``generate_shared``) against eight generations of one, on two workloads:
        8 different images, and 2 images with 4 questions each (VQA benchmarks ask several questions per
        image: VQAv2 5.4 on average, POPE 18, the panels 7)."""
        n = len(QUESTIONS)
        for name, images in (("8 images", pictures(n)), ("2 images x 4 questions", pictures(2) * (n // 2))):
            batch = prompt_inputs(self.processor, images, QUESTIONS)
            singles = [prompt_inputs(self.processor, [image], [q]) for image, q in zip(images, QUESTIONS, strict=True)]
            tokens = self.settings.eval_tokens

            def timed(batches: list[dict], generate: Callable, tokens: int = tokens) -> Callable[[], dict]:
                def run() -> dict:
                    start = self.now()
                    first = [timed_generate(generate, inputs, tokens, self.pad, self.now)["ttft"] for inputs in batches]
                    elapsed = self.now() - start
                    return {"samples_per_s": n / elapsed, "prefill_s_per_sample": sum(first) / n,
                            "decode_s_per_sample": (elapsed - sum(first)) / n}
                return run

            # Each side is already eight generations long: a third of the repeats keeps the run short.
            runs = paired(timed([batch], self.model.generate_shared), timed(singles, self.model.generate),
                          max(1, self.settings.repeats // 3), self.memory)
            self.facts[f"batched_eval_split ({name})"] = {
                side: {key: statistics.median(r[key] for r in results) for key in ("prefill_s_per_sample",
                                                                                    "decode_s_per_sample")}
                for side, results in zip(("batch 8", "batch 1"), runs, strict=True)}
            self.rows.append(row_from(f"batched evaluation, {name}", "samples/s", "samples_per_s", runs,
                                      ("batch 8 (generate_shared)", "batch 1"), (">=", 3.0),
                                      note=f"{tokens} new tokens per answer"))

    def training(self) -> None:
        """Stage 1 and 2 samples/s, with the feature cache against without, from the second epoch on."""
        s = self.settings
        work = s.workdir / "train"
        tower, lm, data = prepare_training(work, s.quick, s.train_samples)
        note = (f"{s.train_samples} synthetic panels, batch {s.train_batch}, 2 epochs, rate over epoch 2 (the cache "
                f"is built before epoch 1, one tower pass per image); {training_parts(s.quick)}")
        for stage, records, template, target in (("align", "captions.json", "plain", (">=", 1.5)),
                                                 ("instruct", "stage2.json", "chat", None)):
            overrides = [f"model.vision_tower={tower}", f"model.language_model={lm}", f"stage={stage}",
                         f"model.projector={DEMO_PROJECTOR}", f"data.path={data / records}",
                         f"data.image_folder={data}", f"data.template={template}",
                         f"data.cache_dir={work / 'feature_cache'}", "data.max_length=1024",
                         f"train.batch_size={s.train_batch}", "train.epochs=2", "train.lora_r=32",
                         "train.lora_alpha=64", f"output_dir={work / 'out'}"]
            def rate(cache: bool, overrides: list[str] = overrides) -> dict:
                return {"samples_per_s": second_epoch_rate([*overrides, f"data.cache_features={cache}"], self.now)}

            runs = paired(lambda: rate(True), lambda: rate(False), s.repeats, self.memory)
            self.rows.append(row_from(f"stage {1 if stage == 'align' else 2} ({stage}) training", "samples/s",
                                      "samples_per_s", runs, ("feature cache", "tower every step"), target,
                                      note=note))

    def bf16(self) -> None:
        """bf16 where the CPU runs it at a useful speed (a matmul probe decides); the models go back to fp32."""
        fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
        self.facts["matmul_gflops"] = {"float32": fp32, "bfloat16": bf16}
        mode = self.settings.bf16
        names = ("bf16 first-turn time to first token", "bf16 decode tokens/s")
        if mode == "off" or (mode == "auto" and bf16 < 0.5 * fp32):
            why = (f"bf16 matmul {bf16:.1f} GFLOP/s against {fp32:.1f} in fp32 on this CPU" if mode == "auto"
                   else "--bf16 off")
            for name, unit, target in zip(names, ("s", "tok/s"), (("<=", 1.0), (">=", 1.0)), strict=True):
                self.rows.append(Row(name, unit, *LLAVA_LABELS, target=target, skipped=why))
            return
        inputs = prompt_inputs(self.processor, [self.image], [QUESTIONS[0]])
        self.model.to(torch.bfloat16)
        self.llava.to(torch.bfloat16)
        try:
            runs = self._against_llava(inputs)
        finally:
            self.model.to(torch.float32)
            self.llava.to(torch.float32)
        fp32_ttft = self.facts["first_turn_split_s_float32"]["project"]["ttft"]
        fp32_decode = self.facts["project_decode_tps_float32"]
        self.facts["project_bf16_speedup_over_fp32"] = {
            "ttft": fp32_ttft / statistics.median(r["ttft"] for r in runs[0]),
            "decode": statistics.median(r["decode_tps"] for r in runs[0]) / fp32_decode}
        self.rows.append(row_from(names[0], "s", "ttft", runs, LLAVA_LABELS, ("<=", 1.0)))
        self.rows.append(row_from(names[1], "tok/s", "decode_tps", runs, LLAVA_LABELS, (">=", 1.0)))


def _weights_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


# ---- output ---------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = [f"{'row':<46}{'project':>11}{'baseline':>11}  {'ratio [min-max]':<22}{'target':<9}{'':<6}"
             f"{'MB':>13}  note"]
    for row in rows:
        target = row["target"] or "-"
        if "skipped" in row:
            lines.append(f"{row['name']:<46}{'':>11}{'':>11}  {'skipped':<22}{target:<9}{'-':<6}{'':>13}  "
                         f"{row['skipped']}")
            continue
        ratio = row["ratio"]
        verdict = "-" if row["passed"] is None else ("pass" if row["passed"] else "MISS")
        memory = "/".join(f"{m['median']:.0f}" if m else "-" for m in (row["project_extra_mb"],
                                                                      row["baseline_extra_mb"]))
        lines.append(f"{row['name']:<46}{_num(row['project_value']['median']):>11}"
                     f"{_num(row['baseline_value']['median']):>11}  "
                     f"{ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]".ljust(92) +
                     f"{target:<9}{verdict:<6}{memory:>13}  {row['unit']}; {row['note']}")
    return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.4g}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    shown = [r for r in rows if "ratio" in r]
    figure, axis = pyplot.subplots(figsize=(8, 0.45 * len(shown) + 1.2), dpi=100)
    for y, row in enumerate(shown):
        ratio = row["ratio"]
        colour = {True: "tab:green", False: "tab:red", None: "tab:gray"}[row["passed"]]
        axis.barh(y, ratio["median"], color=colour, alpha=0.7)
        axis.plot([ratio["min"], ratio["max"]], [y, y], color="black", linewidth=1)
        if row["target"]:
            axis.plot([float(row["target"].split()[1])] * 2, [y - 0.4, y + 0.4], color="black", linestyle="--")
    axis.set_yticks(range(len(shown)), [r["name"] for r in shown], fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("ratio, project / baseline (bar: median, line: min-max, dashed: target)")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny parts, one repeat: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the models are built and kept between runs (default runs/benchmark; "
                             "quick: a temporary folder)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared machine "
                             "(use with --threads 1)")
    parser.add_argument("--only", default=None, metavar="GROUPS",
                        help=f"comma-separated groups to re-measure ({', '.join(ALL_GROUPS)}); the other groups' "
                             "rows are kept from the existing --out file (each row is a same-run ratio on its own); "
                             "data runs benchmarks/data.py into data_results.json beside --out")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="auto: run bf16 rows only if a bf16 matmul is at least half as fast as fp32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1 or (args.threads is not None and args.threads < 1):
        print("error: --repeats and --threads must be at least 1", file=sys.stderr)
        return 2
    chosen = GROUPS if args.only is None else tuple(g.strip() for g in args.only.split(",") if g.strip())
    unknown = [g for g in chosen if g not in ALL_GROUPS]
    if unknown or not chosen:
        print(f"error: --only takes groups from {', '.join(ALL_GROUPS)} (got {args.only!r})", file=sys.stderr)
        return 2
    only = tuple(g for g in GROUPS if g in chosen)
    if only and only != GROUPS and not args.out.is_file():
        print(f"error: --only keeps the other groups' rows from {args.out}, which does not exist", file=sys.stderr)
        return 2
    if "data" in chosen and (code := run_data(args.out.with_name("data_results.json"), args.quick)):
        return code
    if not only:
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or (Path(scratch) if args.quick else ROOT / "runs" / "benchmark")
        settings = Settings(quick=args.quick, repeats=repeats, threads=torch.get_num_threads(),
                            new_tokens=4 if args.quick else 16, eval_tokens=4 if args.quick else 16,
                            train_samples=8 if args.quick else 64, train_batch=4 if args.quick else 8,
                            bf16=args.bf16, clock=args.clock, workdir=workdir)
        return run(settings, args.out, only)


def run_data(out: Path, quick: bool) -> int:
    """The data pipeline suite (benchmarks/data.py: 665K records, or a smoke run in a scratch folder)."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, str(ROOT / "benchmarks" / "data.py"), "--out", str(out)]
        return subprocess.run([*command, "--quick", "--workdir", scratch] if quick else command).returncode


def run(settings: Settings, out: Path, only: tuple[str, ...] = GROUPS) -> int:
    previous = json.loads(out.read_text()) if only != GROUPS else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".partial").write_text("")
        out.with_suffix(".partial").unlink()
    except OSError as error:
        print(f"error: cannot write {out}: {error.strerror}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    suite = Suite(settings, *prepare_models(settings))
    rows: list[dict] = []
    if previous:  # later groups read earlier ones' facts (bf16 compares with the fp32 first turn)
        suite.facts = {**previous["facts"], **suite.facts}
    for group in tqdm(GROUPS, desc="benchmark", unit="group"):
        if group in only:
            suite.rows = []
            getattr(suite, group)()
            rows += [{**row.as_dict(), "group": group} for row in suite.rows]
        else:
            rows += [row for row in previous["rows"] if row.get("group") == group]
    facts = suite.facts
    settings_out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
    if previous:
        settings_out = {**previous["settings"], "groups_remeasured": {**previous["settings"].get(
            "groups_remeasured", {}), **{group: settings_out for group in only}}}
    result = {"settings": settings_out, "facts": facts, "bandwidth_convention": BANDWIDTH_CONVENTION,
              "memory_convention": f"{MEMORY_CONVENTION} [{suite.memory.method}]", "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(table(rows))
    print(f"\nthreads {settings.threads}, repeats {settings.repeats}, fp32 unless the row says bf16; "
          f"ratio = project / baseline per repeat (for throughput rows higher is better)")
    print(f"bandwidth: {BANDWIDTH_CONVENTION}")
    print(f"memory (MB column, project/baseline): {MEMORY_CONVENTION} [{suite.memory.method}]")
    print(f"facts: {json.dumps(suite.facts, default=str)}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
