"""Hugging Face Llava interop, both ways: same logits (fp32, <= 1e-4) and the same greedy tokens."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from vlm import ModelConfig, build_vlm, load_pretrained
from vlm.hf_llava import ExportError, export_llava
from vlm.vision import vision_config_of

PAIRS = [("clip", "llama"), ("siglip", "qwen2"), ("clip", "qwen2"), ("siglip", "llama")]
PROMPTS = ["<image>\nwhat is the asset code ?", "USER: <image>\nis the fault lamp on ? ASSISTANT:"]


def _pictures() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(11)
    return [Image.fromarray(torch.randint(0, 256, (56, 56, 3), generator=generator, dtype=torch.uint8).numpy())
            for _ in PROMPTS]


def _compare(ours, our_processor, theirs, their_processor) -> None:
    pictures = _pictures()
    our_inputs = our_processor(images=pictures, text=PROMPTS)
    their_inputs = their_processor(images=pictures, text=PROMPTS, return_tensors="pt", padding=True)
    assert our_inputs["input_ids"].tolist() == their_inputs["input_ids"].tolist()
    torch.testing.assert_close(our_inputs["pixel_values"], their_inputs["pixel_values"])
    with torch.no_grad():
        our_logits = ours(**our_inputs).logits
        their_logits = theirs(**their_inputs).logits
    mask = our_inputs["attention_mask"].bool()
    assert (our_logits - their_logits)[mask].abs().max().item() <= 1e-4
    our_tokens = ours.generate(**our_inputs, max_new_tokens=8, do_sample=False)
    their_tokens = theirs.generate(**their_inputs, max_new_tokens=8, do_sample=False)
    assert our_tokens.tolist() == their_tokens.tolist()


@pytest.mark.parametrize(("tower", "lm"), PAIRS)
def test_export_to_llava_gives_same_logits_and_tokens(tmp_path, parts, tower, lm):
    ours, our_processor = build_vlm(ModelConfig(vision_tower=str(parts[tower]), language_model=str(parts[lm])))
    torch.manual_seed(0)
    for p in ours.projector.parameters():  # a non-trivial projector, so a wrong copy would show
        torch.nn.init.normal_(p, std=0.2)
    ours.save_pretrained(tmp_path / "ours", our_processor)
    result = subprocess.run([sys.executable, "-m", "vlm.export", str(tmp_path / "ours"), str(tmp_path / "hf")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.model_type == "llava" and config.image_seq_length == ours.config.tokens_per_image
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    their_processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    their_processor.tokenizer.padding_side = "left"
    _compare(ours, our_processor, theirs, their_processor)


def _random_llava_folder(out, tower_dir, lm_dir) -> None:
    """A Llava checkpoint made by transformers alone, as a user would download one."""
    vision_config = vision_config_of(AutoConfig.from_pretrained(tower_dir))
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    text_config = AutoConfig.from_pretrained(lm_dir)
    text_config.vocab_size = len(tokenizer)
    has_cls = vision_config.model_type == "clip_vision_model"
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=16, vision_feature_select_strategy="default" if has_cls else "full")
    torch.manual_seed(3)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    size = vision_config.image_size
    mean = [0.48145466, 0.4578275, 0.40821073] if has_cls else [0.5, 0.5, 0.5]
    image_processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": size}, image_mean=mean,
                                             crop_size={"height": size, "width": size}, image_std=mean)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                   num_additional_image_tokens=int(has_cls)).save_pretrained(out)


@pytest.mark.parametrize(("tower", "lm"), PAIRS[:2])
def test_import_from_llava_gives_same_logits_and_tokens(tmp_path, parts, tower, lm):
    _random_llava_folder(tmp_path / "hf", parts[tower], parts[lm])
    ours, our_processor = load_pretrained(tmp_path / "hf")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    their_processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    their_processor.tokenizer.padding_side = "left"
    _compare(ours, our_processor, theirs, their_processor)
    # ... and an imported model saves as a project folder that loads back the same.
    ours.save_pretrained(tmp_path / "project", our_processor)
    again, again_processor = load_pretrained(tmp_path / "project")
    _compare(again, again_processor, theirs, their_processor)


def test_export_refuses_what_llava_cannot_hold(tmp_path, parts):
    model, processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts["llama"]),
                                             projector="merge2x2_mlp"))
    with pytest.raises(ExportError, match="cannot export because Llava's projector is mlp2x_gelu"):
        export_llava(model, processor, tmp_path / "hf")
    model.save_pretrained(tmp_path / "merge", processor)
    result = subprocess.run([sys.executable, "-m", "vlm.export", str(tmp_path / "merge"), str(tmp_path / "hf")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot export because")
    assert "Traceback" not in result.stderr
