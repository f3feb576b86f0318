"""Hugging Face Llava interop, both ways: same pixels, logits (fp32, <= 1e-4) and greedy tokens on non-square images."""

import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from vlm import ModelConfig, ModelFolderError, build_vlm, load_pretrained
from vlm.hf_llava import ExportError, export_llava
from vlm.vision import vision_config_of

PAIRS = [("clip", "llama"), ("siglip", "qwen2"), ("clip", "qwen2"), ("siglip", "llama")]
PROMPTS = ["<image>\nwhat is the asset code ?", "USER: <image>\nis the fault lamp on ? ASSISTANT:",
           "the gauge reads\n<image>"]
SIZES = [(200, 300), (300, 200), (97, 401)]  # width x height: tall, wide, very tall


def _pictures() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(11)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
            for w, h in SIZES]


def _compare(ours, our_processor, theirs, their_processor) -> None:
    pictures = _pictures()
    our_inputs = our_processor(images=pictures, text=PROMPTS, return_tensors="pt", padding=True)
    their_inputs = their_processor(images=pictures, text=PROMPTS, return_tensors="pt", padding=True)
    assert our_inputs["input_ids"].tolist() == their_inputs["input_ids"].tolist()
    torch.testing.assert_close(our_inputs["pixel_values"], their_inputs["pixel_values"])
    with torch.no_grad():
        our_logits = ours(**our_inputs).logits
        their_logits = theirs(**their_inputs).logits
    mask = our_inputs["attention_mask"].bool()
    assert (our_logits - their_logits)[mask].abs().max().item() <= 1e-4
    our_tokens = ours.generate(**our_inputs, max_new_tokens=8, do_sample=False)
    # Our models never generate the <image> placeholder; random weights may pick it, so Llava is told the same.
    their_tokens = theirs.generate(**their_inputs, max_new_tokens=8, do_sample=False,
                                   suppress_tokens=[theirs.config.image_token_id])
    assert our_tokens.tolist() == their_tokens.tolist()


@pytest.mark.parametrize(("tower", "lm", "aspect"), [(*pair, aspect) for pair, aspect in
                                                     zip(PAIRS, ["pad", "crop", "resize", "pad"], strict=True)])
def test_export_to_llava_gives_same_logits_and_tokens(tmp_path, parts, tower, lm, aspect):
    ours, our_processor = build_vlm(ModelConfig(vision_tower=str(parts[tower]), language_model=str(parts[lm]),
                                                image_aspect=aspect))
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


def _random_llava_folder(out, tower_dir, lm_dir, do_pad: bool = True, unused_tokens: int = 0) -> None:
    """A Llava checkpoint made by transformers alone, as a user would download one.

    ``unused_tokens``: the tokenizer lists that many tokens after ``<image>`` that the LM has no rows for.
    """
    vision_config = vision_config_of(AutoConfig.from_pretrained(tower_dir))
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    text_config = AutoConfig.from_pretrained(lm_dir)
    text_config.vocab_size = len(tokenizer)
    tokenizer.add_tokens([f"<unused{i}>" for i in range(unused_tokens)], special_tokens=True)
    has_cls = vision_config.model_type == "clip_vision_model"
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=16, vision_feature_select_strategy="default" if has_cls else "full")
    torch.manual_seed(3)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    size = vision_config.image_size
    mean = [0.48145466, 0.4578275, 0.40821073] if has_cls else [0.5, 0.5, 0.5]
    if has_cls:  # CLIP: resize the short side, centre-crop
        image_processor = LlavaImageProcessorPil(do_pad=do_pad, size={"shortest_edge": size}, image_mean=mean,
                                                 crop_size={"height": size, "width": size}, image_std=mean)
    else:  # SigLIP-based Llavas resize straight to a square
        image_processor = LlavaImageProcessorPil(do_pad=do_pad, size={"height": size, "width": size},
                                                 do_center_crop=False, image_mean=mean, image_std=mean)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                   num_additional_image_tokens=int(has_cls)).save_pretrained(out)


def _llava(folder):
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    processor.tokenizer.padding_side = "left"
    return LlavaForConditionalGeneration.from_pretrained(folder), processor


@pytest.mark.parametrize(("tower", "lm", "do_pad"), [("clip", "llama", True), ("clip", "llama", False),
                                                     ("siglip", "qwen2", True), ("siglip", "qwen2", False)])
def test_import_from_llava_gives_same_logits_and_tokens(tmp_path, parts, tower, lm, do_pad):
    _random_llava_folder(tmp_path / "hf", parts[tower], parts[lm], do_pad)
    ours, our_processor = load_pretrained(tmp_path / "hf")
    theirs, their_processor = _llava(tmp_path / "hf")
    _compare(ours, our_processor, theirs, their_processor)
    # ... and an imported model saves as a project folder that loads back with every weight and the vocabulary
    # unchanged, and exports again to a Llava that matches the original one.
    ours.save_pretrained(tmp_path / "project", our_processor)
    again, again_processor = load_pretrained(tmp_path / "project")
    assert len(again_processor.tokenizer) == len(our_processor.tokenizer)
    assert again.language_model.get_input_embeddings().num_embeddings == theirs.config.text_config.vocab_size
    before, after = ours.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    _compare(again, again_processor, theirs, their_processor)
    export_llava(again, again_processor, tmp_path / "hf_again")
    _compare(*_llava(tmp_path / "hf_again"), theirs, their_processor)


def test_round_trip_never_grows_an_imported_vocabulary(tmp_path, parts):
    _random_llava_folder(tmp_path / "hf", parts["clip"], parts["qwen2"], unused_tokens=1)
    ours, our_processor = load_pretrained(tmp_path / "hf")
    rows = ours.language_model.get_input_embeddings().num_embeddings
    assert rows == len(our_processor.tokenizer) - 1
    ours.save_pretrained(tmp_path / "project", our_processor)
    again, _ = load_pretrained(tmp_path / "project")
    assert again.language_model.get_input_embeddings().num_embeddings == rows
    assert again.language_model.get_output_embeddings().weight.shape[0] == rows


def test_llava_folder_without_all_its_weights_is_refused(tmp_path, parts):
    _random_llava_folder(tmp_path / "hf", parts["clip"], parts["llama"])
    weights = tmp_path / "hf" / "model.safetensors"
    name = re.escape(str(weights))
    whole = weights.read_bytes()
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "linear_2" not in k}, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=rf"^{name}: lacks .*multi_modal_projector\.linear_2\.bias"):
        load_pretrained(tmp_path / "hf")
    layer = next(k for k in tensors if "layers.0.mlp.up_proj" in k)
    save_file({**tensors, layer: tensors[layer][:3]}, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=r"mis-shaped .*up_proj\.weight \(\(3, 64\) in the file"):
        load_pretrained(tmp_path / "hf")
    for cut in (whole[: len(whole) // 2], b""):
        weights.write_bytes(cut)
        with pytest.raises(ModelFolderError, match=rf"^{name} is not a complete safetensors file"):
            load_pretrained(tmp_path / "hf")


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


def test_an_imported_llava_keeps_llava_processors_tokens_through_a_save(tmp_path, parts):
    """LlavaProcessor tokenizes the whole expanded prompt; with a non-legacy sentencepiece Llama that differs
    from LLaVA's split at <image>, so an import keeps the whole-string rule, and so does its saved folder."""
    import json

    from vlm.testing import tiny_lm

    lm = tiny_lm(tmp_path / "vicuna", "llama", tokenizer="sentencepiece")
    settings = json.loads((lm / "tokenizer_config.json").read_text())
    (lm / "tokenizer_config.json").write_text(json.dumps({**settings, "legacy": False}))
    ours, our_processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(lm)))
    export_llava(ours, our_processor, tmp_path / "hf")
    theirs = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    expected = _unpadded(theirs)
    split = _unpadded(our_processor)
    assert split != expected  # the two rules differ on this tokenizer, so the checks below can fail

    imported, imported_processor = load_pretrained(tmp_path / "hf")
    assert _unpadded(imported_processor) == expected
    imported.save_pretrained(tmp_path / "project", imported_processor)
    _, reloaded_processor = load_pretrained(tmp_path / "project")
    assert _unpadded(reloaded_processor) == expected


def _unpadded(processor) -> list[list[int]]:
    inputs = processor(images=_pictures(), text=PROMPTS, padding=True, return_tensors="pt")
    return [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]


@pytest.mark.parametrize("lm", ["qwen2", "llama"])  # ChatML, and a Llama-3 template that writes BOS itself
def test_exported_chat_template_takes_transformers_content_lists(tmp_path, parts, lm):
    ours, our_processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts[lm])))
    torch.manual_seed(0)
    for p in ours.projector.parameters():
        torch.nn.init.normal_(p, std=0.2)
    export_llava(ours, our_processor, tmp_path / "hf")
    their_processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the asset code ?"}]}]
    written = [{"role": "user", "content": "<image>\nwhat is the asset code ?"}]
    prompt = their_processor.apply_chat_template(listed, add_generation_prompt=True)
    assert prompt == their_processor.apply_chat_template(written, add_generation_prompt=True)
    assert prompt == our_processor.apply_chat_template(written) and "<image>\nwhat is" in prompt
    # A whole conversation: a text-only part list, an assistant reply as parts, the image after the text.
    chat = [{"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "the code is KX-4821 ."}]},
            {"role": "user", "content": [{"type": "text", "text": "is the fault lamp on ?"}, {"type": "image"}]}]
    as_text = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the code is KX-4821 ."},
               {"role": "user", "content": "<image>\nis the fault lamp on ?"}]
    assert their_processor.apply_chat_template(chat) == our_processor.apply_chat_template(as_text, False)
    # Imported and exported again, the template is wrapped once.
    again, again_processor = load_pretrained(tmp_path / "hf")
    export_llava(again, again_processor, tmp_path / "again")
    assert AutoProcessor.from_pretrained(tmp_path / "again").chat_template == their_processor.chat_template

    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    picture = _pictures()[0]
    their_inputs = their_processor(images=[picture], text=[prompt], return_tensors="pt")
    our_inputs = our_processor(images=[picture], text=[prompt], return_tensors="pt")
    assert our_inputs["input_ids"].tolist() == their_inputs["input_ids"].tolist()
    with torch.no_grad():
        difference = ours(**our_inputs).logits - theirs(**their_inputs).logits
    assert difference.abs().max().item() <= 1e-4
