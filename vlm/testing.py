"""Models built here, from configs, with random weights: no download ever.

Two kinds, both saved with ``save_pretrained`` and read back through ``from_pretrained`` so that
tests walk the same path as a hub model:

- tiny towers (CLIP, SigLIP) and tiny LMs (Llama, Qwen2) with a tokenizer trained locally, for tests;
- the real ViT-L/14-336 and Qwen2.5-0.5B architectures, for speed and memory figures.

``python -m vlm.testing --out DIR`` writes the tiny parts used by ``configs/tiny.yaml``.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Siglip2ImageProcessorPil,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlm.chat_templates import CHATML

CLIP_MEAN, CLIP_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINOv2's
TOWER_FAMILIES = ("clip", "siglip", "dinov2", "dinov2_registers", "siglip2_naflex")

# ChatML (Qwen2) and Llama-3 style templates: two different end-of-turn conventions, so code that
# builds loss masks from a rendering is exercised on more than one shape.
CHATML_TEMPLATE = CHATML
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

_CORPUS = """\
the panel shows a gauge a tag and lamps . what is the asset code ? the code is KX-4821 .
is the fault lamp on ? yes , the fault lamp is on and red . the run lamp is off .
a crack near the top left corner . corrosion at the bottom right . scorch mark in the center .
the gauge reads 42 . severity is high . recommended action : isolate and shut down .
describe the image in detail . a chat between a curious user and an assistant .
0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 green amber blue red white yellow black
"""


def train_tokenizer(out_dir: str | Path, vocab_size: int = 384, template: str = "chatml",
                    corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer here and save it as a transformers tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or _CORPUS.splitlines() * 4, trainer=trainer)
    chatml = template == "chatml"
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<pad>",
        eos_token="<|im_end|>" if chatml else "<|eot_id|>",
        chat_template=CHATML_TEMPLATE if chatml else LLAMA3_TEMPLATE,
    )
    wrapped.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def train_sentencepiece_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """A Llama-style sentencepiece tokenizer as Vicuna and LLaVA ship it: ``tokenizer.model`` only, no
    ``tokenizer.json``, legacy behaviour, ``<s>``/``</s>``/``<unk>`` at ids 1/2/0, byte fallback."""
    import sentencepiece
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = (_CORPUS + "USER: ASSISTANT: The assistant gives helpful, detailed, and polite answers to the "
              "user's questions.\n").splitlines() * 8
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 2048, "clean_up_tokenization_spaces": False}, indent=2))
    return AutoTokenizer.from_pretrained(out_dir)


def tiny_lm(out_dir: str | Path, family: str = "llama", vocab_size: int = 384, hidden_size: int = 64,
            layers: int = 2, seed: int = 0, tokenizer: str = "bpe") -> Path:
    """A small Llama or Qwen2 causal LM with a trained tokenizer, saved as a hub-style folder.

    ``tokenizer="sentencepiece"`` gives the Llama a Vicuna-style ``tokenizer.model``-only tokenizer.
    """
    out_dir = Path(out_dir)
    if tokenizer == "sentencepiece":
        tokenizer = train_sentencepiece_tokenizer(out_dir, max(vocab_size, 400))
    else:
        tokenizer = train_tokenizer(out_dir, vocab_size, "chatml" if family == "qwen2" else "llama3")
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Qwen2Config(**common, tie_word_embeddings=True) if family == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    return out_dir


def tiny_tower(out_dir: str | Path, family: str = "clip", image_size: int = 56, patch_size: int = 14,
               hidden_size: int = 32, layers: int = 3, full_clip: bool = False, seed: int = 0) -> Path:
    """A small vision tower of one of ``TOWER_FAMILIES`` plus its image processor, saved as a hub-style folder.

    ``full_clip`` saves a whole CLIPModel (text tower too), the shape of openai/clip-vit-*. DINOv2's config
    says a larger side than its processor crops to (518 vs 224 in facebook/dinov2-*): here one patch more.
    ``siglip2_naflex``: SigLIP 2's NaFlex tower, a budget of ``(image_size // patch_size) ** 2`` patches.
    """
    out_dir = Path(out_dir)
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    if family in ("dinov2", "dinov2_registers"):
        vision.update(image_size=image_size + patch_size, mlp_ratio=2)
        del vision["intermediate_size"]
        if family == "dinov2":
            Dinov2Model(Dinov2Config(**vision)).save_pretrained(out_dir)
        else:
            Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**vision, num_register_tokens=4)).save_pretrained(out_dir)
        BitImageProcessorPil(size={"shortest_edge": image_size * 8 // 7}, crop_size={"height": image_size,
                             "width": image_size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                             do_convert_rgb=True).save_pretrained(out_dir)
        return out_dir
    if family == "siglip2_naflex":
        budget = (image_size // patch_size) ** 2
        del vision["image_size"]
        Siglip2VisionModel(Siglip2VisionConfig(**vision, num_patches=budget)).save_pretrained(out_dir)
        Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=budget).save_pretrained(out_dir)
        return out_dir
    if family not in TOWER_FAMILIES:
        raise ValueError(f"tiny_tower family {family!r} is not one of {', '.join(TOWER_FAMILIES)}")
    if family == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(out_dir)
        SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
        return out_dir
    if full_clip:
        text = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                    num_attention_heads=4, vocab_size=100, max_position_embeddings=16)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden_size)).save_pretrained(out_dir)
    else:
        CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(out_dir)
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(out_dir)
    return out_dir


def real_size_configs() -> tuple[CLIPVisionConfig, Qwen2Config]:
    """ViT-L/14-336 (as in openai/clip-vit-large-patch14-336) and Qwen2.5-0.5B, for benchmarks."""
    tower = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                             hidden_act="quick_gelu")
    llm = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    return tower, llm


def real_size_parts(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Save the real-size tower and LM (random weights) with a local tokenizer; returns both folders."""
    out_dir = Path(out_dir)
    tower_config, llm_config = real_size_configs()
    torch.manual_seed(seed)
    tower_dir, llm_dir = out_dir / "clip-vit-large-patch14-336", out_dir / "qwen2.5-0.5b"
    CLIPVisionModel(tower_config).save_pretrained(tower_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(tower_dir)
    tokenizer = train_tokenizer(llm_dir, 512, "chatml")
    llm_config.bos_token_id, llm_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    llm_config.pad_token_id = tokenizer.pad_token_id
    AutoModelForCausalLM.from_config(llm_config).save_pretrained(llm_dir)
    return tower_dir, llm_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m vlm.testing``; returns the exit status (2: bad input, said in one line on stderr)."""
    from vlm.cli import ArgumentParser, UsageError, fail, set_verbosity

    parser = ArgumentParser(prog="python -m vlm.testing",
                            description="Write the tiny random-weight parts used by configs/tiny.yaml.")
    parser.add_argument("--out", default="runs/tiny-parts")
    parser.add_argument("--real-size", action="store_true", help="also write ViT-L/14-336 + Qwen2.5-0.5B")
    try:
        args = parser.parse_args(argv)
        set_verbosity(args.verbose)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
    except UsageError as error:
        return fail(error)
    tiny_tower(out / "clip", image_size=56)
    tiny_lm(out / "llama", family="llama")
    if args.real_size:
        real_size_parts(out / "real")
    print(f"wrote tiny parts to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
