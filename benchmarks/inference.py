"""The inference rows: the project against Hugging Face Llava on the same weights.

First and second turn, the 4x token cut, batched evaluation and bf16, each a method of
:class:`InferenceSuite` that returns its rows and adds what it learns on the way to ``facts``.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from benchmarks.harness import (
    PeakMemory,
    Row,
    Settings,
    clock_for,
    first_call_times,
    medians,
    paired,
    row_from,
    spread,
    timed_generate,
)
from vlm import ModelConfig, build_vlm, load_pretrained
from vlm.hf_llava import export_llava
from vlm.model import VLM
from vlm.processor import VLMProcessor
from vlm.projector import build_projector, projected_tokens
from vlm.session import ChatSession
from vlm.testing import real_size_parts, tiny_lm, tiny_tower

QUESTIONS = ["what is the asset code ?", "is the fault lamp on ?", "what does the gauge read ?",
             "describe the image in detail .", "is there a crack near the top left corner ?",
             "what is the severity ?", "what is the recommended action ?", "is the run lamp off ?"]
BANDWIDTH_CONVENTION = ("floor tokens/s = bytes READ per second (a large tensor copy, its writes not counted) / "
                        "bytes read per decoded token (every LM weight once - the input embedding table only "
                        "when tied to lm_head, else one row - plus the K and V of every layer at the mean "
                        "decode context)")
LLAVA_LABELS = ("vlm.VLM.generate", "LlavaForConditionalGeneration.generate")


# ---- models -------------------------------------------------------------------------------------------
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


def _weights_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


# ---- machine probes -----------------------------------------------------------------------------------
def read_bandwidth(megabytes: int, now: Callable[[], float]) -> float:
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


# ---- the rows -----------------------------------------------------------------------------------------
class InferenceSuite:
    """Both models loaded once; each group method measures its rows."""

    GROUPS = ("first_turn", "second_turn", "token_cut", "batched_eval", "bf16")

    def __init__(self, settings: Settings, memory: PeakMemory, facts: dict) -> None:
        self.settings, self.memory, self.facts = settings, memory, facts
        self.now = clock_for(settings.clock)
        project_dir, llava_dir = prepare_models(settings)
        self.model, self.processor = load_pretrained(project_dir)
        self.llava = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
        self.llava_processor = AutoProcessor.from_pretrained(llava_dir, backend="pil")
        self.pad = self.processor.tokenizer.pad_token_id
        self.image = pictures(1)[0]
        facts.update({
            "attention": {"project_lm": self.model.language_model.config._attn_implementation,
                          "project_tower": self.model.vision_tower.encoder.config._attn_implementation,
                          "llava": self.llava.config.text_config._attn_implementation},
            "tokens_per_image": self.model.config.tokens_per_image,
            "weights_mb": {"project": _weights_mb(self.model), "llava": _weights_mb(self.llava)},
        })

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
        self.facts[f"first_turn_split_s_{dtype}"] = medians(runs, ("project", "llava"),
                                                            ("tower", "decoder", "lm_head", "ttft"))
        return runs

    def _generation(self, generate: Callable, inputs: dict, modules: dict[str, torch.nn.Module],
                    new_tokens: int | None = None) -> Callable[[], dict]:
        """One timed greedy generation, with the wall or CPU time of each module's prefill call."""
        def run() -> dict:
            stages: dict = {}
            with first_call_times(modules, stages, self.now):
                result = timed_generate(generate, inputs, new_tokens or self.settings.new_tokens, self.pad, self.now)
            return {**stages, **result}
        return run

    def first_turn(self) -> list[Row]:
        """Same prompt, same tensors, same number of greedy tokens; plus the bandwidth floor for decode."""
        s = self.settings
        inputs = prompt_inputs(self.processor, [self.image], [QUESTIONS[0]])
        bandwidth: list[float] = []
        runs = self._against_llava(inputs, before_each=lambda: bandwidth.append(
            read_bandwidth(64 if s.quick else 1024, self.now)))
        same = all(a["tokens"] == b["tokens"] for a, b in zip(*runs, strict=True))
        self.facts["project_decode_tps_float32"] = statistics.median(r["decode_tps"] for r in runs[0])
        context = inputs["input_ids"].shape[1] + s.new_tokens / 2
        per_token = decode_bytes_per_token(self.model, context)
        self.facts.update(read_bandwidth_gb_s=spread([b / 1e9 for b in bandwidth]),
                          decode_bytes_per_token_mb=per_token / 2**20, greedy_tokens_identical=same)
        floors = [b / per_token for b in bandwidth]
        return [
            row_from("first-turn time to first token", "s", "ttft", runs, LLAVA_LABELS, ("<=", 1.0),
                     note=f"prompt {inputs['input_ids'].shape[1]} tokens"),
            row_from("decode tokens/s", "tok/s", "decode_tps", runs, LLAVA_LABELS, (">=", 1.0),
                     note=f"{s.new_tokens} greedy tokens, identical: {same}"),
            Row("decode vs memory-bandwidth floor", "tok/s", "vlm decode", "bandwidth floor",
                values=([r["decode_tps"] for r in runs[0]], floors), target=(">=", 0.6),
                note=f"{per_token / 2**20:.0f} MB read per token"),
        ]

    def _second_turn(self, model: VLM, processor: VLMProcessor, reencode: Callable[..., object],
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

    def second_turn(self) -> list[Row]:
        runs = self._second_turn(self.model, self.processor, self.llava.generate, self.llava_processor)
        return [row_from("second-turn time to first token", "s", "ttft", runs,
                         ("ChatSession (KV cache kept)", "Llava re-encodes image + conversation"), ("<=", 0.1))]

    def token_cut(self) -> list[Row]:
        """merge2x2_mlp against mlp2x_gelu on the same tower and LM: the LLM's prefill and the whole TTFT."""
        cut, cut_processor = with_projector(self.model, self.processor, "merge2x2_mlp")

        def prefill(model: VLM, processor: VLMProcessor) -> Callable[[], dict]:
            inputs = prompt_inputs(processor, [self.image], [QUESTIONS[0]])
            return self._generation(model.generate, inputs, {"tower": model.vision_tower,
                                                             "llm": model.language_model}, new_tokens=1)

        runs = paired(prefill(cut, cut_processor), prefill(self.model, self.processor), self.settings.repeats,
                      self.memory)
        labels = (f"merge2x2_mlp ({cut.config.tokens_per_image} tokens)",
                  f"mlp2x_gelu ({self.model.config.tokens_per_image} tokens)")
        tower_share = statistics.median(r["tower"] / r["ttft"] for r in runs[0])
        self.facts["token_cut_split_s"] = medians(runs, ("merge2x2_mlp", "mlp2x_gelu"), ("tower", "llm", "ttft"))
        rows = [row_from("4x token cut: LLM prefill", "s", "llm", runs, labels, ("<=", 0.35)),
                row_from("4x token cut: first-turn time to first token", "s", "ttft", runs, labels,
                         note=f"the tower is {tower_share:.0%} of it and does not shrink")]
        runs = self._second_turn(cut, cut_processor, cut.generate, cut_processor)
        rows.append(row_from("4x token cut: second-turn time to first token", "s", "ttft", runs,
                             ("ChatSession (KV cache kept)", "re-encoding image + conversation"), ("<=", 0.1)))
        return rows

    def batched_eval(self) -> list[Row]:
        """A batch of 8 questions (``generate_shared``) against eight generations of one, on two workloads:
        8 different images, and 2 images with 4 questions each (VQA benchmarks ask several questions per
        image: VQAv2 5.4 on average, POPE 18, the panels 7)."""
        n, tokens, rows = len(QUESTIONS), self.settings.eval_tokens, []
        for name, images in (("8 images", pictures(n)), ("2 images x 4 questions", pictures(2) * (n // 2))):
            batch = prompt_inputs(self.processor, images, QUESTIONS)
            singles = [prompt_inputs(self.processor, [image], [q]) for image, q in zip(images, QUESTIONS, strict=True)]

            def timed(batches: list[dict], generate: Callable) -> Callable[[], dict]:
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
            self.facts[f"batched_eval_split ({name})"] = medians(runs, ("batch 8", "batch 1"),
                                                                 ("prefill_s_per_sample", "decode_s_per_sample"))
            rows.append(row_from(f"batched evaluation, {name}", "samples/s", "samples_per_s", runs,
                                 ("batch 8 (generate_shared)", "batch 1"), (">=", 3.0),
                                 note=f"{tokens} new tokens per answer"))
        return rows

    def bf16(self) -> list[Row]:
        """bf16 where the CPU runs it at a useful speed (a matmul probe decides); the models go back to fp32."""
        fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
        self.facts["matmul_gflops"] = {"float32": fp32, "bfloat16": bf16}
        mode = self.settings.bf16
        names = ("bf16 first-turn time to first token", "bf16 decode tokens/s")
        if mode == "off" or (mode == "auto" and bf16 < 0.5 * fp32):
            why = (f"bf16 matmul {bf16:.1f} GFLOP/s against {fp32:.1f} in fp32 on this CPU" if mode == "auto"
                   else "--bf16 off")
            return [Row(name, unit, *LLAVA_LABELS, target=target, skipped=why)
                    for name, unit, target in zip(names, ("s", "tok/s"), (("<=", 1.0), (">=", 1.0)), strict=True)]
        inputs = prompt_inputs(self.processor, [self.image], [QUESTIONS[0]])
        self.model.to(torch.bfloat16)
        self.llava.to(torch.bfloat16)
        try:
            runs = self._against_llava(inputs)
        finally:
            self.model.to(torch.float32)
            self.llava.to(torch.float32)
        # The fp32 figures come from this run's first_turn, or from the results file under --only.
        fp32_ttft = self.facts["first_turn_split_s_float32"]["project"]["ttft"]
        fp32_decode = self.facts["project_decode_tps_float32"]
        self.facts["project_bf16_speedup_over_fp32"] = {
            "ttft": fp32_ttft / statistics.median(r["ttft"] for r in runs[0]),
            "decode": statistics.median(r["decode_tps"] for r in runs[0]) / fp32_decode}
        return [row_from(names[0], "s", "ttft", runs, LLAVA_LABELS, ("<=", 1.0)),
                row_from(names[1], "tok/s", "decode_tps", runs, LLAVA_LABELS, (">=", 1.0))]
