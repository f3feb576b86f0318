"""The demo's stand-in for a downloaded LLM: a tokenizer and a small Qwen2 LM, both trained on the synthetic corpus.

The corpus is the text of a ``vlm.synth`` folder (captions and every instruction conversation, rendered
through the chat template with the image placeholder dropped), so the LM knows the words, the
answer formats and the chat turns before it ever sees an image, as a pretrained instruct LLM would.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from vlm.testing import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
ROLES = {"human": "user", "gpt": "assistant"}


def conversations_to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns -> chat messages, image placeholder removed (the LM is pretrained on text alone)."""
    return [{"role": ROLES[turn["from"]], "content": turn["value"].replace("<image>", "").strip()}
            for turn in conversations]


def corpus_texts(data_dir: str | Path, tokenizer: PreTrainedTokenizerFast | None = None) -> list[str]:
    """Every caption and conversation of a synth folder; chat-rendered when a tokenizer is given."""
    data_dir = Path(data_dir)
    records = json.loads((data_dir / "captions.json").read_text()) + \
        json.loads((data_dir / "instruct.json").read_text())
    texts = []
    for record in records:
        messages = conversations_to_messages(record["conversations"])
        if tokenizer is None:
            texts.append("\n".join(m["content"] for m in messages))
        else:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML turns; end of turn (``<|im_end|>``) is the eos token.

    Digits are split one by one before BPE: asset codes and gauge readings are then copied digit by
    digit instead of through thousands of rare merged number tokens.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<pad>",
                                      eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    wrapped.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def lm_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 256, layers: int = 4) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=hidden_size // 32, num_key_value_heads=2,
                       max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def pack(token_lists: list[list[int]], length: int) -> torch.Tensor:
    """Concatenate documents (each ends in eos) and cut into rows of ``length`` tokens, as LLM pretraining does."""
    flat = [t for tokens in token_lists for t in tokens]
    rows = len(flat) // length
    return torch.tensor(flat[:rows * length]).view(rows, length)


def pretrain_lm(texts: list[str], tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, steps: int = 600,
                batch_size: int = 16, seq_len: int = 256, lr: float = 3e-3, hidden_size: int = 256,
                layers: int = 4, seed: int = 0) -> dict:
    """Next-token pretraining on packed corpus text; saves model + tokenizer; returns the loss history."""
    torch.manual_seed(seed)
    random.Random(seed).shuffle(texts)
    rows = pack(tokenizer(texts, add_special_tokens=False)["input_ids"], seq_len)
    model = AutoModelForCausalLM.from_config(lm_config(tokenizer, hidden_size, layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                                 (1 + math.cos(math.pi * min(s, steps) / steps)))
    history, generator, started = [], torch.Generator().manual_seed(seed), time.perf_counter()
    model.train()
    for step in (bar := tqdm(range(steps), desc="pretrain LM", unit="step")):
        batch = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"history": history, "rows": len(rows), "tokens_seen": steps * batch_size * seq_len,
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - started}
