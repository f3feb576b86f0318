"""VLMProcessor: LLaVA's tokenizer_image_token ids (one BOS), legacy or not, and the pixel rule of each image_aspect."""

import pytest
import torch
from PIL import Image
from test_llava_preprocess import SlowLlamaTokenizer, set_legacy
from transformers import AutoImageProcessor

from vlm import ModelConfig, VLMProcessor, build_vlm
from vlm.testing import tiny_lm

LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the user's questions.")
QUESTIONS = ["<image>\nwhat is the asset code ?", "is the fault lamp on ?\n<image>",
             "the gauge <image> reads 42 . and <image> this one ?", "describe the image in detail ."]
IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def vicuna(request, parts, tmp_path_factory):
    """A Vicuna-style model: tokenizer.model-only sentencepiece Llama, LLaVA-1.5's vicuna_v1 template; and the
    slow tokenizer LLaVA would run on it."""
    lm = tiny_lm(tmp_path_factory.mktemp("vicuna"), "llama", tokenizer="sentencepiece")
    set_legacy(lm, request.param)
    model, processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(lm),
                                             chat_template="vicuna_v1"))
    assert processor.tokenizer.legacy is request.param
    return model, processor, SlowLlamaTokenizer(lm / "tokenizer.model", request.param)


def _llava_ids(prompt: str, tokenizer: SlowLlamaTokenizer) -> list[int]:
    """LLaVA's tokenizer_image_token: tokenize the text between images one chunk at a time, keep one BOS."""
    chunks = [tokenizer(chunk) for chunk in prompt.split("<image>")]
    keep_bos = bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id
    ids = [tokenizer.bos_token_id] if keep_bos else []
    for i, chunk in enumerate(chunks):
        ids += ([IMAGE] if i else []) + chunk[int(keep_bos):]
    return ids


def _collapsed(ids: list[int], image_token_id: int) -> list[int]:
    """Our ids with each run of image slots as LLaVA's single -200."""
    out: list[int] = []
    for token in ids:
        if token == image_token_id and out and out[-1] == IMAGE:
            continue
        out.append(IMAGE if token == image_token_id else token)
    return out


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy())


def test_vicuna_prompt_has_one_bos_and_llavas_ids(vicuna):
    model, processor, llava = vicuna
    tokenizer = processor.tokenizer
    prompts = [processor.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    for question, prompt in zip(QUESTIONS, prompts, strict=True):  # the template writes LLaVA's conv_vicuna_v1
        assert prompt == tokenizer.bos_token + f"{LLAVA_SYSTEM} USER: {question} ASSISTANT:"
    pictures = [[_picture(40, 30, i)] * q.count("<image>") for i, q in enumerate(QUESTIONS)]
    batch = processor(images=pictures, text=prompts)
    for row, prompt in enumerate(prompts):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
        # LLaVA's own prompt has no BOS text: its tokenizer adds the one BOS.
        expected = _llava_ids(prompt.removeprefix(tokenizer.bos_token), llava)
        assert _collapsed(ids, model.config.image_token_id) == expected
        alone = processor(images=pictures[row] or None, text=prompt)["input_ids"][0].tolist()
        assert alone == ids == processor.encode(prompt)


def test_text_without_bos_gets_the_tokenizers_one(vicuna):
    _, processor, llava = vicuna
    ids = processor(text="is the fault lamp on ?")["input_ids"][0].tolist()
    assert ids == llava("is the fault lamp on ?")
    mixed = processor(text=["is the lamp on ?", processor.tokenizer.bos_token + "is the lamp on ?"])
    rows = [r[m.bool()].tolist() for r, m in zip(mixed["input_ids"], mixed["attention_mask"], strict=True)]
    assert rows[0] == rows[1] == llava("is the lamp on ?")


def test_pad_fill_is_llavas_truncated_mean(tiny_model):
    _, processor = tiny_model
    assert processor.pad_fill == (122, 116, 104)  # tuple(int(x * 255) for x in CLIP's image_mean)


def _expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square, written out again."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, 0) if height > width else (0, (side - height) // 2))
    return square


@pytest.mark.parametrize("size", [(200, 300), (300, 200), (97, 401)])
def test_each_aspect_gives_its_rule_and_a_call_can_override_it(parts, size):
    clip = AutoImageProcessor.from_pretrained(parts["clip"], backend="pil")
    processor = VLMProcessor(_tokenizer(parts), clip, 16, image_aspect="pad")
    picture = _picture(*size)
    fill = tuple(int(x * 255) for x in clip.image_mean)
    padded = processor.preprocess_images([picture])
    torch.testing.assert_close(padded, clip([_expand2square(picture, fill)], return_tensors="pt")["pixel_values"],
                               rtol=0, atol=0)
    # crop: the CLIP processor's own resize-short-side + centre crop, no squaring first.
    cropped = processor.preprocess_images([picture], aspect="crop")
    torch.testing.assert_close(cropped, clip([picture], return_tensors="pt")["pixel_values"], rtol=0, atol=0)
    assert processor.image_aspect == "pad" and not torch.equal(cropped, padded)
    # SigLIP resizes straight to a square; its crop is the same short side + centre crop, never a stretch.
    siglip = AutoImageProcessor.from_pretrained(parts["siglip"], backend="pil")
    side = siglip.size.height
    short = min(size)
    resized = picture.resize((side * size[0] // short, side * size[1] // short), Image.Resampling.BICUBIC)
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    centre = resized.crop((left, top, left + side, top + side))
    siglip_processor = VLMProcessor(_tokenizer(parts), siglip, 16, image_aspect="crop")
    torch.testing.assert_close(siglip_processor.preprocess_images([picture]),
                               siglip([centre], return_tensors="pt")["pixel_values"], rtol=0, atol=0)
    stretched = siglip([picture], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(siglip_processor.preprocess_images([picture], aspect="resize"), stretched, rtol=0, atol=0)
    with pytest.raises(ValueError, match="image_aspect='fit' is not one of pad, resize, crop"):
        processor.preprocess_images([picture], aspect="fit")


def _tokenizer(parts):
    from vlm.processor import load_tokenizer

    return load_tokenizer(str(parts["llama"]))
