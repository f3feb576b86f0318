"""Inspection reports that always parse: a versioned JSON Schema, and generation constrained by it.

The schema is ``vlm.inspection.REPORT_SCHEMA``. ``generate_report(model, processor, image)`` runs
``model.generate`` under an llguidance token mask compiled from the schema, in the layout the stage-2 data teaches
(``json.dumps`` defaults: ``", "`` and ``": "``, keys in schema order). Every string, list and number
in the schema is bounded, so the longest valid report has a known length; generation gets that many
new tokens, and even a model of random weights ends with a complete, schema-valid report.

``python -m vlm.report IMAGES_DIR --out OUT_DIR`` writes reports for a folder of images
(``vlm/report/__main__.py``); ``python -m vlm.report --schema`` prints the schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import llguidance
import llguidance.hf
import torch
from PIL import Image
from transformers import LogitsProcessor

from vlm.inspection import REPORT_PROMPTS, REPORT_SCHEMA, SCHEMA_VERSION, SEPARATORS
from vlm.model import VLM
from vlm.processor import VLMProcessor

REPORT_PROMPT = REPORT_PROMPTS[0]


class ReportError(RuntimeError):
    """Generated text that is not a complete report of the schema, with a one-line message."""


def longest_report(schema: dict = REPORT_SCHEMA):
    """The shape of the longest report: every list full, every choice its longest, strings at maxLength.

    Strings are filler (not matched to their patterns): only the length counts.
    """
    if "enum" in schema:
        return max(schema["enum"], key=lambda value: len(json.dumps(value)))
    kind = schema["type"]
    if kind == "object":
        return {key: longest_report(value) for key, value in schema["properties"].items()}
    if kind == "array":
        return [longest_report(schema["items"])] * schema["maxItems"]
    if kind == "integer":
        return max(schema["minimum"], schema["maximum"], key=lambda value: len(str(value)))
    if kind == "string":
        return "x" * schema["maxLength"]  # one byte a character: the patterns allow no escapes
    return False  # boolean: "false" is the longer word


def longest_report_chars(schema: dict = REPORT_SCHEMA) -> int:
    """Characters in the longest report the schema allows, written as the constraint writes it."""
    return len(json.dumps(longest_report(schema), separators=SEPARATORS))


def compile_report_grammar(tokenizer: llguidance.LLTokenizer, schema: dict = REPORT_SCHEMA) -> str:
    """The llguidance grammar of ``schema`` in json.dumps' layout; an unsupported keyword is an error, not ignored."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={
        "whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]})
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error or messages:
        raise ValueError(f"llguidance cannot enforce the schema exactly: {'; '.join(messages)}")
    return grammar


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token the grammar does not allow next, one matcher per row of one ``generate`` call.

    A complete report leaves only the stop token allowed. Once a row has taken it, the row is finished
    (generate pads it) and its scores are left alone.
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self.tokenizer, self.grammar, self.stop_id = tokenizer, grammar, tokenizer.eos_token
        self.matchers: list[llguidance.LLMatcher] = []
        self.finished: list[bool] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.matchers:  # the first step: nothing generated yet
            self.matchers = [llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0) for _ in input_ids]
            self.finished = [False] * len(input_ids)
        else:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if self.finished[row]:
                    continue
                if not self.matchers[row].consume_token(token):
                    raise ReportError(f"the grammar rejected token {token}: {self.matchers[row].get_error()}")
                self.finished[row] = token == self.stop_id
        active = [row for row, finished in enumerate(self.finished) if not finished]
        if not active:
            return scores
        words = torch.frombuffer(bytearray(b"".join(self.matchers[row].compute_bitmask() for row in active)),
                                 dtype=torch.int32).view(len(active), -1)
        bits = (words[..., None] >> torch.arange(32, dtype=torch.int32)) & 1  # bit i of word w: token 32w+i
        allowed = bits.flatten(1)[:, :scores.shape[1]].to(device=scores.device, dtype=torch.bool)
        scores[active] = scores[active].masked_fill(~allowed, float("-inf"))
        return scores


class ReportGenerator:
    """Schema-constrained reports from one model: the grammar is compiled once, reports are made in batches.

    ``max_new_tokens`` defaults to the longest report's length plus the stop token: every allowed token
    writes at least one byte (llguidance allows no special token inside the grammar), so a report
    cannot run out of tokens before the grammar closes it.
    """

    def __init__(self, model: VLM, processor: VLMProcessor, max_new_tokens: int | None = None,
                 temperature: float = 0.0, schema: dict = REPORT_SCHEMA) -> None:
        self.model, self.processor, self.temperature = model, processor, temperature
        self.max_new_tokens = max_new_tokens or longest_report_chars(schema) + 1
        eos = model.language_model.generation_config.eos_token_id
        self.stop_ids = [eos] if isinstance(eos, int) else list(eos or [processor.tokenizer.eos_token_id])
        vocab_size = model.language_model.get_output_embeddings().weight.shape[0]
        # One stop token closes a report (any of generate's stops ends it); a single id is also what
        # llguidance 1.6, the last with Linux aarch64 wheels, accepts.
        self.tokenizer = llguidance.hf.from_tokenizer(processor.tokenizer, n_vocab=vocab_size,
                                                      eos_token=self.stop_ids[0])
        self.grammar = compile_report_grammar(self.tokenizer, schema)
        self.prompt = processor.apply_chat_template(
            [{"role": "user", "content": f"{processor.image_token}\n{REPORT_PROMPT}"}], add_generation_prompt=True)

    def generate_texts(self, images: Sequence[Image.Image]) -> list[str]:
        """The constrained report text of each image (one ``generate`` call for the batch)."""
        inputs = self.processor(images=list(images), text=[self.prompt] * len(images), return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                     logits_processor=[GrammarLogitsProcessor(self.tokenizer, self.grammar)],
                                     pad_token_id=self.processor.tokenizer.pad_token_id, **sampling)
        texts = []
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            # Everything before the first stop token; the grammar allows nothing special before it.
            end = next((i for i, token in enumerate(row) if token in self.stop_ids), len(row))
            texts.append(self.processor.tokenizer.decode(row[:end], skip_special_tokens=False,
                                                         clean_up_tokenization_spaces=False))
        return texts

    def parse(self, text: str) -> dict:
        """The report in ``text``, checked by llguidance's matcher against the compiled schema."""
        matcher = llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if not matcher.consume_tokens(self.tokenizer.tokenize_str(text)):
            raise ReportError(f"text is not a report of schema {SCHEMA_VERSION}: {text[:80]!r}")
        if not matcher.is_accepting():
            raise ReportError(f"the report is incomplete after {len(text)} characters (max_new_tokens="
                              f"{self.max_new_tokens} is below the schema's bound)")
        return json.loads(text)

    def __call__(self, images: Sequence[Image.Image]) -> list[dict]:
        return [self.parse(text) for text in self.generate_texts(images)]


def generate_report(model: VLM, processor: VLMProcessor, image: Image.Image, max_new_tokens: int | None = None,
                    temperature: float = 0.0) -> dict:
    """The inspection report of one image, valid against ``REPORT_SCHEMA`` whatever the model's weights."""
    return ReportGenerator(model, processor, max_new_tokens, temperature)([image])[0]
