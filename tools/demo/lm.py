"""The demo's stand-in for a downloaded LLM: a tokenizer and a small Qwen2 LM, both trained on the synthetic corpus.

The corpus is the text of a ``vlm.synth`` folder (captions and every instruction conversation, rendered
through the chat template), so the LM knows the words, the answer formats and the chat turns before it
ever sees an image, as a pretrained instruct LLM would. Where the image goes, each document holds the
panel's text twin (``tools.demo.twin.image_twin``): the answers then come from earlier in the context,
the asset code copied character by character, the skill a downloaded instruct LLM brings; this one
gets it from ``instruction_tune`` (``tune_until_it_answers`` checks it).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from eval.formats import Question
from tools.demo.score import answer_from_twins, panel_metas, score
from tools.demo.twin import DAMAGE_WORDS, FACT_TOKENS, image_twin, special_twin_tokens
from vlm.chat_templates import CHATML
from vlm.inspection import LOCATIONS, REPORT_PROMPTS
from vlm.synth import SHORT, damage_question, panel_questions

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
ROLES = {"human": "user", "gpt": "assistant"}


def conversations_to_messages(conversations: list[dict], image_text: str = "") -> list[dict]:
    """LLaVA turns -> chat messages, the image placeholder replaced by ``image_text``."""
    return [{"role": ROLES[turn["from"]], "content": turn["value"].replace("<image>", image_text).strip()}
            for turn in conversations]


def panel_twins(data_dir: str | Path) -> dict[str, str]:
    """Image path -> the panel's text twin, for every panel of a synth folder."""
    return {m["image"]: image_twin(m["report"]) for m in panel_metas(data_dir)}


def corpus_texts(data_dir: str | Path, tokenizer: PreTrainedTokenizerFast | None = None) -> list[str]:
    """Every caption and conversation of a synth folder, the panel's twin where the image goes;
    chat-rendered when a tokenizer is given."""
    data_dir = Path(data_dir)
    twins = panel_twins(data_dir)
    records = json.loads((data_dir / "captions.json").read_text()) + \
        json.loads((data_dir / "instruct.json").read_text())
    texts = []
    for record in records:
        messages = conversations_to_messages(record["conversations"], twins[record["image"]])
        if tokenizer is None:
            texts.append("\n".join(m["content"] for m in messages))
        else:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML turns; end of turn (``<|im_end|>``) is the eos token.

    Digits and capital letters are split one by one before BPE: asset codes, lamp labels and gauge
    readings are then copied character by character, each character always the same token, instead of
    through hundreds of rare merged tokens ("BR", " K") that differ by context. The twin's fact tokens
    are added whole.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Split(Regex("[A-Z]"), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + special_twin_tokens(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<pad>",
                                      eos_token="<|im_end|>", chat_template=CHATML)
    wrapped.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def lm_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 256, layers: int = 4) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=hidden_size // 32, num_key_value_heads=2,
                       max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def compose_damage_embeddings(model, tokenizer: PreTrainedTokenizerFast) -> None:
    """Start each cell's damage token (``<top-left dent>``) as the sum of the mean embeddings of its words'
    tokens (" top-left", " dent"): the six tokens of a cell then share a direction from the first step,
    as the question's words do, and the LM can find the asked cell among nine.

    Only the damage tokens: composing the lamp tokens too (``<FAULT on>`` from the code's capitals) kept
    the LM from copying the code.
    """
    embeddings = model.get_input_embeddings().weight
    for (location, state), token in zip(DAMAGE_WORDS, FACT_TOKENS["damage"], strict=True):
        words = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in (location, state)]
        embeddings[tokenizer.convert_tokens_to_ids(token)] = sum(embeddings[ids].mean(0) for ids in words)


def pack(token_lists: list[list[int]], length: int) -> torch.Tensor:
    """Concatenate documents (each ends in eos) and cut into rows of ``length`` tokens, as LLM pretraining does."""
    flat = [t for tokens in token_lists for t in tokens]
    rows = len(flat) // length
    return torch.tensor(flat[:rows * length]).view(rows, length)


def fit(model, next_batch: Callable[[], dict], steps: int, lr: float, weight_decay: float, warmup: int,
        desc: str) -> tuple[list[dict], float]:
    """AdamW with linear warmup and cosine decay, clipped at norm 1; the model is left in eval mode.
    Returns the loss per step and the seconds taken."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                                 (1 + math.cos(math.pi * min(s, steps) / steps)))
    history, started = [], time.perf_counter()
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, unit="step")):
        loss = model(**next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    model.eval()
    return history, time.perf_counter() - started


def pretrain_lm(texts: list[str], tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, steps: int = 600,
                batch_size: int = 16, seq_len: int = 256, lr: float = 3e-3, hidden_size: int = 256,
                layers: int = 4, seed: int = 0) -> dict:
    """Next-token pretraining on packed corpus text; saves model + tokenizer; returns the loss history."""
    torch.manual_seed(seed)
    random.Random(seed).shuffle(texts)
    rows = pack(tokenizer(texts, add_special_tokens=False)["input_ids"], seq_len)
    model = AutoModelForCausalLM.from_config(lm_config(tokenizer, hidden_size, layers))
    compose_damage_embeddings(model, tokenizer)
    generator = torch.Generator().manual_seed(seed)

    def next_batch() -> dict:
        batch = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
        return {"input_ids": batch, "labels": batch}

    history, seconds = fit(model, next_batch, steps, lr, weight_decay=0.01, warmup=max(1, steps // 20),
                           desc="pretrain LM")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"history": history, "rows": len(rows), "tokens_seen": steps * batch_size * seq_len,
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": seconds}


# Questions the LM's instruction tuning asks twice: the answers it must copy digit by digit from the twin,
# a skill that arrives late and that the model's reading depends on.
COPIED_TWICE = ("asset_code", "gauge")


def question_records(data_dir: str | Path) -> list[dict]:
    """The LM's instruction tuning: every eval-style question of a synth folder (``questions.jsonl``) as a
    one-turn LLaVA conversation, the ``COPIED_TWICE`` categories twice.

    One question per record teaches copying the code from the print; records asking for it once among
    six other questions do not.
    """
    records = []
    for line in (Path(data_dir) / "questions.jsonl").read_text().splitlines():
        question = json.loads(line)
        record = {"id": question["question_id"], "image": question["image"], "conversations": [
            {"from": "human", "value": "<image>\n" + question["text"]}, {"from": "gpt", "value": question["answer"]}]}
        records += [record] * (2 if question["category"] in COPIED_TWICE else 1)
    return records


def cell_question_records(data_dir: str | Path, seed: int = 0) -> list[dict]:
    """For each panel of a synth folder, the damage question about every damaged cell and about as many
    intact cells (one at least), drawn with ``seed``: the LM must find the asked cell's twin token.

    The folder's own questions ask about one cell per panel, a damaged one 70% of the time, and an LM
    tuned on them answers by whichever damage the twin holds instead of finding the asked cell; these
    records and ``compose_damage_embeddings`` together fix that.
    """
    rng, records = random.Random(seed), []
    for meta in panel_metas(data_dir):
        damaged = {item["location"]: item["type"] for item in meta["report"]["damage"]}
        intact = [cell for cell in LOCATIONS if cell not in damaged]
        for cell in [*damaged, *rng.sample(intact, max(1, len(damaged)))]:
            question, answer, _ = damage_question(cell, damaged.get(cell, "none"), rng)
            records.append({"id": f"{meta['id']}_damage_{cell}", "image": meta["image"], "conversations": [
                {"from": "human", "value": f"<image>\n{question}{SHORT}"}, {"from": "gpt", "value": answer}]})
    return records


def sentence_records(data_dir: str | Path, seed: int = 0) -> list[dict]:
    """For each panel of a synth folder, the ``COPIED_TWICE`` questions as a user asks them (no answer
    format asked) with the full-sentence answer ("The asset tag reads KX-4821."), phrasings drawn with ``seed``.

    Copying the code into a sentence is a skill of its own: an LM that copies it into every short answer
    may still put a wrong code into "The asset tag reads ...".
    """
    rng, records = random.Random(seed), []
    for meta in panel_metas(data_dir):
        asked = panel_questions(meta["report"], rng)
        for category in COPIED_TWICE:
            question, _, sentence = asked[category]
            records.append({"id": f"{meta['id']}_{category}_sentence", "image": meta["image"], "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": sentence}]})
    return records


def instruction_records(data_dir: str | Path, long_share: float = 0.2, seed: int = 0) -> list[dict]:
    """``question_records``, ``cell_question_records`` and ``sentence_records``, plus JSON reports and detailed descriptions of the
    same folder (``instruct.json``), as many as ``long_share`` of the questions, drawn at random with ``seed``.

    On questions alone the LM forgets every other format (it answers the report prompt with a bare
    code), so reports and descriptions stay in the mix.
    """
    questions = question_records(data_dir)
    longs = [r for r in json.loads((Path(data_dir) / "instruct.json").read_text())
             if r["id"].endswith(("_report", "_detail"))]
    return (questions + cell_question_records(data_dir, seed) + sentence_records(data_dir, seed) +
            random.Random(seed).sample(longs, min(len(longs), round(long_share * len(questions)))))


# What the stand-in LM must answer from exact twins before the recipe goes on: the demo's targets.
GATE_CATEGORIES = ("asset_code", "asset_code_chat", "lamp", "damage_present", "damage_type", "action",
                   "gauge_within_5")


def report_codes(model, tokenizer: PreTrainedTokenizerFast, data_dir: str | Path, limit: int = 50) -> float:
    """Share of the first ``limit`` panels of ``data_dir`` whose report, written by the bare LM from the
    panel's exact twin, carries the panel's asset code (greedy, unconstrained)."""
    metas = panel_metas(data_dir, limit)
    prompts = [Question(m["id"], m["id"], REPORT_PROMPTS[0], m["image"]) for m in metas]
    replies = answer_from_twins(model, tokenizer, prompts, {m["image"]: image_twin(m["report"]) for m in metas},
                                max_new_tokens=256, desc="LM reports")
    codes = [re.search(r'"asset_code": "([^"]*)"', reply) for reply in replies]
    return sum(bool(c) and c.group(1) == m["report"]["asset_code"] for c, m in zip(codes, metas, strict=True)) / len(metas)


def tune_until_it_answers(texts_dir: str | Path, records: list[dict], tokenizer: PreTrainedTokenizerFast,
                          lm_dir: str | Path, gate_dir: str | Path, first_steps: int, more_steps: int,
                          max_rounds: int, threshold: float = 0.95, rounds_done: int = 0,
                          on_check: Callable[[dict], None] | None = None) -> list[dict]:
    """``instruction_tune`` in rounds (``first_steps``, then ``more_steps`` each, round r drawing with seed r)
    until the LM answers ``threshold`` of ``gate_dir``'s questions right in every ``GATE_CATEGORIES``, and
    writes the right code into that share of reports (``report_codes``), from the panels' exact twins, or
    ``max_rounds``.

    ``gate_dir``: a synth folder of its own seed, so the codes are ones it never saw (a copy test) and
    the gate never looks at the panels the demo is scored on. Copying the code arrives as a jump whose
    step varies from run to run, and the other facts need more rounds too, so the gate checks after
    every round instead of fixing their number.
    ``rounds_done``: rounds an earlier run already gave this LM (a rerun goes on from there). Returns one
    entry per round, after the check before the first; ``on_check`` gets each entry as soon as it is made.
    """
    twins = panel_twins(gate_dir)

    def gate(model) -> dict:
        result = score(model, tokenizer, gate_dir, twins=twins, desc="LM gate")
        answers = {c: result[c] for c in GATE_CATEGORIES} | {"report_asset_code": report_codes(model, tokenizer, gate_dir)}
        return {"answers": answers, "worst": min(answers.values())}

    rounds = [{"steps": 0, **gate(AutoModelForCausalLM.from_pretrained(lm_dir))}]
    if on_check is not None:
        on_check(rounds[-1])
    while rounds[-1]["worst"] < threshold and rounds_done + len(rounds) <= max_rounds:
        index = rounds_done + len(rounds) - 1
        steps = first_steps if index == 0 else more_steps
        tuned = instruction_tune(texts_dir, records, tokenizer, lm_dir, steps=steps, seed=index)
        rounds.append({"round": index + 1, "steps": steps, "seconds": round(tuned["seconds"], 1),
                       "final_loss": sum(h["loss"] for h in tuned["history"][-20:]) / len(tuned["history"][-20:]),
                       **gate(AutoModelForCausalLM.from_pretrained(lm_dir))})
        print(f"LM round {index + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in rounds[-1]["answers"].items()),
              flush=True)
        if on_check is not None:
            on_check(rounds[-1])
    return rounds


def length_grouped_batches(records: list[dict], batch_size: int, rng: random.Random,
                           long_chars: int = 250) -> Iterator[list[dict]]:
    """Endless random batches of one kind: short records or long ones (``long_chars`` and more in all
    turns), each kind as often as its share of ``records``.

    A report is ~4x a short answer's tokens, and one in a random batch pads all of it to its length;
    sorting by length, as transformers' ``group_by_length`` does, makes batches of one question each,
    and the LM then learns damage types worse.
    """
    def length(record: dict) -> int:
        return sum(len(turn["value"]) for turn in record["conversations"])

    kinds = [kind for kind in ([r for r in records if length(r) < long_chars],
                               [r for r in records if length(r) >= long_chars]) if kind]
    while True:
        kind = rng.choices(kinds, [len(k) for k in kinds])[0]
        yield rng.sample(kind, min(len(kind), batch_size))


def instruction_tune(texts_dir: str | Path, records: list[dict], tokenizer: PreTrainedTokenizerFast,
                     lm_dir: str | Path, steps: int = 600, batch_size: int = 16, lr: float = 1e-3,
                     seed: int = 0) -> dict:
    """Supervised tuning of the pretrained LM on conversations (the panel's twin where the image goes),
    loss on the replies only, as an instruct LLM is made from its base; saves over ``lm_dir``.

    Answers are a small share of the corpus' tokens, so pretraining on every token does not teach copying
    them from the twin; with the loss on the replies alone the LM learns it within a few thousand steps.
    ``records`` are LLaVA conversations over the panels of ``texts_dir``.
    """
    from vlm.data.dataset import collate
    from vlm.data.templates import SampleError, encode

    twins = panel_twins(texts_dir)

    def sample(record: dict) -> dict:  # encoded when drawn: a run draws only a part of a large file
        messages = conversations_to_messages(record["conversations"], twins[record["image"]])
        try:  # no image here: the unknown token never occurs in byte-level text, so nothing is expanded
            ids, labels = encode(messages, tokenizer, "chat", tokenizer.unk_token, 1, 1024)
        except SampleError as error:
            raise ValueError(f"record {record['id']}: {error}") from error
        return {"id": record["id"], "input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    rng = random.Random(seed)
    batches = length_grouped_batches(records, batch_size, rng)

    def next_batch() -> dict:
        batch = collate([sample(r) for r in next(batches)], tokenizer.pad_token_id)
        return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}

    history, seconds = fit(model, next_batch, steps, lr, weight_decay=0.0, warmup=1, desc="instruction-tune LM")
    model.save_pretrained(lm_dir)
    return {"history": history, "records": len(records), "seconds": seconds}
