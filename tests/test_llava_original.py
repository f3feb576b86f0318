"""Original haotian-liu/LLaVA checkpoints: read as they are, checked against LLaVA's own inference rules.

The reference below re-implements LLaVA-1.5's inference from its source (llava/mm_utils.py, llava_arch.py,
clip_encoder.py, conversation.py): expand2square with ``int(mean * 255)``, the CLIP processor, hidden
state ``[layer][:, 1:]``, the mm_projector, ``tokenizer_image_token`` and the -200 splice.
"""

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, CLIPImageProcessorPil, CLIPVisionModel

from vlm import ModelConfig, load_pretrained
from vlm.convert import main as convert
from vlm.llava_lm import is_original_llava, original_language_model
from vlm.testing import tiny_lm, tiny_tower

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
QUESTION = "what is the gauge reading ?"
TOWER_WIDTH, LM_WIDTH = 16, 64


@pytest.fixture(scope="module")
def llava_parts(tmp_path_factory) -> dict[str, Path]:
    """A whole-CLIP tower at LLaVA-1.5's 336 px / 14 px patches (tiny width) and a Vicuna-style Llama."""
    root = tmp_path_factory.mktemp("llava_parts")
    return {"tower": tiny_tower(root / "clip", image_size=336, patch_size=14, hidden_size=TOWER_WIDTH, layers=2,
                                full_clip=True),
            "lm": tiny_lm(root / "vicuna", "llama", hidden_size=LM_WIDTH, tokenizer="sentencepiece")}


def _llava_config(parts: dict[str, Path], model_type: str, **changes) -> dict:
    config = json.loads((parts["lm"] / "config.json").read_text())
    config.update(model_type=model_type, architectures=["LlavaLlamaForCausalLM"], _name_or_path=str(parts["lm"]),
                  mm_vision_tower=str(parts["tower"]), mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", mm_hidden_size=TOWER_WIDTH, image_aspect_ratio="pad",
                  mm_use_im_start_end=False, mm_use_im_patch_token=False, mm_patch_merge_type="flat",
                  tokenizer_model_max_length=2048, tune_mm_mlp_adapter=False, use_mm_proj=True)
    config.update(changes)
    return config


def _projector_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (LM_WIDTH, TOWER_WIDTH), "0.bias": (LM_WIDTH,), "2.weight": (LM_WIDTH, LM_WIDTH),
              "2.bias": (LM_WIDTH,)}
    return {f"model.mm_projector.{k}": 0.2 * torch.randn(shape, generator=generator) for k, shape in shapes.items()}


def write_original(out: Path, parts: dict[str, Path], model_type: str = "llava_llama", shards: str = "safetensors",
                   drop: tuple[str, ...] = (), extra: dict | None = None, **config_changes) -> Path:
    """A folder as haotian-liu/LLaVA writes it: LM + projector in two shards with an index, tokenizer.model only."""
    out.mkdir(parents=True)
    state = {**AutoModelForCausalLM.from_pretrained(parts["lm"]).state_dict(), **_projector_tensors(), **(extra or {})}
    state = {k: v.contiguous() for k, v in state.items() if k not in drop}
    names = sorted(state)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    template = "model-{:05d}-of-00002.safetensors" if shards == "safetensors" else "pytorch_model-{:05d}-of-00002.bin"
    weight_map = {}
    for number, half in enumerate(halves, 1):
        file = template.format(number)
        if shards == "safetensors":
            save_file({k: state[k] for k in half}, out / file)
        else:
            torch.save({k: state[k] for k in half}, out / file)
        weight_map.update(dict.fromkeys(half, file))
    index = "model.safetensors.index.json" if shards == "safetensors" else "pytorch_model.bin.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(_llava_config(parts, model_type, **config_changes)))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(parts["lm"] / name, out / name)
    return out


def _picture() -> Image.Image:
    """Non-square, so the pad colour and the centring both matter."""
    generator = torch.Generator().manual_seed(3)
    return Image.fromarray(torch.randint(0, 256, (200, 310, 3), generator=generator, dtype=torch.uint8).numpy())


# ---- LLaVA's inference, re-implemented from its source ---------------------------------------------------------
def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def tokenizer_image_token(prompt: str, sentencepiece_model: Path) -> list[int]:
    """Each chunk around <image> tokenized alone as LLaVA's slow legacy LlamaTokenizer does; one BOS kept."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    chunks = [[processor.bos_id()] + processor.encode(chunk) for chunk in prompt.split("<image>")]
    ids = chunks[0]
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + chunk[1:]
    return ids


@torch.no_grad()
def llava_reference(parts: dict[str, Path], image: Image.Image) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    image_processor = CLIPImageProcessorPil.from_pretrained(parts["tower"])
    square = expand2square(image, tuple(int(x * 255) for x in image_processor.image_mean))
    pixels = image_processor.preprocess(square, return_tensors="pt")["pixel_values"]
    tower = CLIPVisionModel.from_pretrained(parts["tower"])
    features = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    projector = nn.Sequential(nn.Linear(TOWER_WIDTH, LM_WIDTH), nn.GELU(), nn.Linear(LM_WIDTH, LM_WIDTH))
    projector.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in _projector_tensors().items()})
    image_embeds = projector(features)[0]

    ids = tokenizer_image_token(f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:", parts["lm"] / "tokenizer.model")
    lm = AutoModelForCausalLM.from_pretrained(parts["lm"])
    at = ids.index(IMAGE_TOKEN_INDEX)
    embed = lm.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(ids[:at])), image_embeds, embed(torch.tensor(ids[at + 1:]))])
    return ids, pixels, lm(inputs_embeds=embeds[None]).logits


def _ours(model, processor, image: Image.Image):
    text = processor.apply_chat_template([{"role": "user", "content": f"<image>\n{QUESTION}"}])
    inputs = processor(images=[image], text=text)
    with torch.no_grad():
        logits = model(**inputs).logits
    return inputs, logits


def _collapse(ids: list[int], image_token_id: int) -> list[int]:
    """Our run of <image> slots as LLaVA's one -200."""
    out = []
    for token in ids:
        if token == image_token_id:
            if not out or out[-1] != IMAGE_TOKEN_INDEX:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(token)
    return out


@pytest.mark.parametrize("model_type", ["llava_llama", "llava"])
@pytest.mark.parametrize("shards", ["safetensors", "bin"])
def test_original_checkpoint_gives_llavas_prompt_pixels_and_logits(tmp_path, llava_parts, model_type, shards):
    folder = write_original(tmp_path / "llava-v1.5-tiny", llava_parts, model_type, shards)
    model, processor = load_pretrained(folder)
    assert (model.config.projector, model.config.vision_feature_layer, model.config.vision_feature_select,
            model.config.image_aspect, model.config.chat_template) == ("mlp2x_gelu", -2, "patch", "pad", "vicuna_v1")
    assert model.config.tokens_per_image == 576

    ref_ids, ref_pixels, ref_logits = llava_reference(llava_parts, _picture())
    inputs, logits = _ours(model, processor, _picture())
    assert _collapse(inputs["input_ids"][0].tolist(), model.config.image_token_id) == ref_ids
    torch.testing.assert_close(inputs["pixel_values"], ref_pixels, rtol=0, atol=1e-6)
    vocab = ref_logits.shape[-1]  # ours has one more row: the <image> token LLaVA does not need
    assert logits.shape[-1] == vocab + 1
    torch.testing.assert_close(logits[..., :vocab], ref_logits, rtol=0, atol=1e-4)


def test_which_configs_are_original_llava():
    assert is_original_llava({"model_type": "llava_llama"})
    assert is_original_llava({"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"]})
    assert is_original_llava({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336"})
    assert not is_original_llava({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                                  "vision_config": {}, "text_config": {}})


def test_folder_settings_are_used_and_unsupported_ones_refused(tmp_path, llava_parts):
    folder = write_original(tmp_path / "square", llava_parts, image_aspect_ratio=None, mm_vision_select_layer=-1,
                            mm_vision_select_feature="cls_patch")
    model, _ = load_pretrained(folder)
    assert (model.config.image_aspect, model.vision_tower.feature_layer, model.config.tokens_per_image) == (
        "crop", -1, 577)
    for number, (change, named) in enumerate([({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
                                              ({"mm_projector_type": "mlp3x_gelu"}, "mlp3x_gelu"),
                                              ({"image_aspect_ratio": "anyres"}, "anyres")]):
        config = json.loads((folder / "config.json").read_text())
        bad = tmp_path / f"bad{number}"
        shutil.copytree(folder, bad)
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=named) as error:
            load_pretrained(bad)
        assert "\n" not in str(error.value)


def test_linear_projector_loads_from_its_own_names(tmp_path, llava_parts):
    generator = torch.Generator().manual_seed(5)
    linear = {"model.mm_projector.weight": torch.randn(LM_WIDTH, TOWER_WIDTH, generator=generator),
              "model.mm_projector.bias": torch.randn(LM_WIDTH, generator=generator)}
    folder = write_original(tmp_path / "linear", llava_parts, mm_projector_type="linear", extra=linear,
                            drop=tuple(_projector_tensors()))
    model, _ = load_pretrained(folder)
    assert isinstance(model.projector, nn.Linear)
    assert torch.equal(model.projector.weight, linear["model.mm_projector.weight"])
    assert torch.equal(model.projector.bias, linear["model.mm_projector.bias"])


def test_missing_tensor_fails_with_its_name_and_unused_ones_are_listed(tmp_path, llava_parts, caplog):
    folder = write_original(tmp_path / "missing", llava_parts, drop=("model.layers.1.mlp.down_proj.weight",))
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) the model needs: model\.layers\.1\.mlp\.down_proj"):
        load_pretrained(folder)
    folder = write_original(tmp_path / "no_projector", llava_parts, drop=("model.mm_projector.2.bias",))
    with pytest.raises(ValueError, match=r"model\.mm_projector\.2\.bias"):
        load_pretrained(folder)

    extra = {"model.vision_tower.vision_tower.post_layernorm.weight": torch.ones(TOWER_WIDTH)}
    folder = write_original(tmp_path / "extra", llava_parts, shards="bin", extra=extra)
    with caplog.at_level(logging.WARNING, logger="vlm.llava_lm"):
        load_pretrained(folder)
    warnings = [r.getMessage() for r in caplog.records if r.name == "vlm.llava_lm"]
    assert len(warnings) == 1 and "1 tensor(s) not used: model.vision_tower.vision_tower.post_layernorm" in warnings[0]


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint would do with worse code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickle_that_runs_code_is_refused(tmp_path, llava_parts):
    folder = write_original(tmp_path / "evil", llava_parts, shards="bin")
    marker = tmp_path / "code_ran"
    shard = folder / "pytorch_model-00002-of-00002.bin"
    torch.save({**torch.load(shard, weights_only=True), "x": _Payload(marker)}, shard)
    with pytest.raises(ValueError, match="pytorch_model-00002-of-00002.bin cannot be read as plain tensors") as error:
        load_pretrained(folder)
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_big_or_incomplete_config_fails_before_allocating(tmp_path, llava_parts):
    seven_b = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000, mm_hidden_size=1024)
    folder = tmp_path / "7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_llava_config(llava_parts, "llava", **seven_b)))
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_pretrained(folder)
    # A shard with a stray tensor: names and shapes are checked on the meta device (a 7B in fp32 would be 27 GB).
    save_file({"model.norm.weight": torch.ones(4096)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 294 tensor\(s\) the model needs: model\.embed_tokens\.weight"):
        load_pretrained(folder)
    assert time.perf_counter() - started < 20

    folder = write_original(tmp_path / "no_width", llava_parts)
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks hidden_size: cannot build its language model"):
        load_pretrained(folder)


def _stage1(folder: Path, parts: dict[str, Path], tensors: dict[str, torch.Tensor]) -> None:
    """What LLaVA's pretrain stage writes: config.json and mm_projector.bin, no LM weights."""
    folder.mkdir()
    torch.save(tensors, folder / "mm_projector.bin")
    (folder / "config.json").write_text(json.dumps(_llava_config(parts, "llava_llama", image_aspect_ratio=None)))


def test_stage1_projector_seeds_stage2(tmp_path, llava_parts):
    tensors = {k: v.half() for k, v in _projector_tensors(seed=7).items()}
    _stage1(tmp_path / "pretrain", llava_parts, tensors)
    base = ModelConfig(vision_tower=str(llava_parts["tower"]), language_model=str(llava_parts["lm"]),
                       projector="linear", image_aspect="pad", chat_template="vicuna_v1")
    model, processor = load_pretrained(tmp_path / "pretrain", base=base)
    assert model.config.projector == "mlp2x_gelu"  # what the weights are, whatever the run's default
    assert model.config.image_aspect == "pad"  # the run's stage-2 pixels, not stage 1's crop
    projector = model.projector.state_dict()
    for theirs, ours in [("0.weight", "linear_1.weight"), ("0.bias", "linear_1.bias"),
                         ("2.weight", "linear_2.weight"), ("2.bias", "linear_2.bias")]:
        assert torch.equal(projector[ours], tensors[f"model.mm_projector.{theirs}"].float())
    lm = AutoModelForCausalLM.from_pretrained(llava_parts["lm"])
    assert torch.equal(model.language_model.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)

    # Without a base the folder's own LM reference (_name_or_path) is used.
    model, _ = load_pretrained(tmp_path / "pretrain")
    assert torch.equal(model.projector.linear_2.bias, tensors["model.mm_projector.2.bias"].float())

    # A projector trained on a tower twice as wide does not fit this one.
    _stage1(tmp_path / "wide", llava_parts, {**tensors, "model.mm_projector.0.weight": torch.zeros(LM_WIDTH, 32)})
    with pytest.raises(ValueError, match=r"mm_projector.bin: tensor model.mm_projector.0.weight has shape \[64, 32\]"):
        load_pretrained(tmp_path / "wide", base=base)
    _stage1(tmp_path / "partial", llava_parts, {k: v for k, v in tensors.items() if k != "model.mm_projector.2.weight"})
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) the model needs: model.mm_projector.2.weight"):
        load_pretrained(tmp_path / "partial", base=base)


def test_convert_round_trip_and_llava_export(tmp_path, llava_parts, capsys):
    folder = write_original(tmp_path / "original", llava_parts, shards="bin")
    model, processor = load_pretrained(folder)
    inputs, logits = _ours(model, processor, _picture())

    assert convert([str(folder), str(tmp_path / "ours"), "--llava", str(tmp_path / "hf")]) == 0
    for out in ("ours", "hf"):
        converted, converted_processor = load_pretrained(tmp_path / out)
        converted_inputs, converted_logits = _ours(converted, converted_processor, _picture())
        assert converted_inputs["input_ids"].tolist() == inputs["input_ids"].tolist()
        torch.testing.assert_close(converted_logits, logits, rtol=0, atol=1e-5)

    capsys.readouterr()
    assert convert([str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_language_model_alone_for_a_config_that_names_the_folder(tmp_path, llava_parts):
    folder = write_original(tmp_path / "original", llava_parts)
    lm = original_language_model(folder)
    source = AutoModelForCausalLM.from_pretrained(llava_parts["lm"]).state_dict()
    assert lm.state_dict().keys() == source.keys()
    assert all(torch.equal(tensor, source[name]) for name, tensor in lm.state_dict().items())


def test_load_in_4bit_quantizes_the_original_lm(tmp_path, llava_parts):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    model, processor = load_pretrained(write_original(tmp_path / "q", llava_parts), load_in_4bit=True)
    layer = model.language_model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Linear4bit) and not isinstance(model.language_model.lm_head, Linear4bit)
    _, logits = _ours(model, processor, _picture())
    assert torch.isfinite(logits).all()


def test_a_stage2_result_whose_language_model_is_an_original_folder_loads(tmp_path, llava_parts):
    """A run started from an original folder saves a config naming it as the LM; that folder must load back."""
    folder = write_original(tmp_path / "original", llava_parts)
    model, processor = load_pretrained(folder)
    model.save_pretrained(tmp_path / "stage2", processor, full=False)
    saved = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert saved["language_model"] == str(folder)
    reloaded, reloaded_processor = load_pretrained(tmp_path / "stage2")
    inputs, logits = _ours(model, processor, _picture())
    again, logits_again = _ours(reloaded, reloaded_processor, _picture())
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    torch.testing.assert_close(logits_again, logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("setting", "expected"), [(None, True), (False, False), (True, True)])
def test_a_tokenizer_config_without_legacy_reads_as_llavas_transformers_did(tmp_path, llava_parts, setting, expected):
    """transformers 4.3x (LLaVA's) took a missing ``legacy`` as true; 5.x takes it as false."""
    folder = write_original(tmp_path / "original", llava_parts)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("legacy")
    if setting is not None:
        settings["legacy"] = setting
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    _, processor = load_pretrained(folder)
    assert processor.tokenizer.legacy is expected
    ids = processor.tokenizer("</s>USER: hi", add_special_tokens=False)["input_ids"]
    pieces = processor.tokenizer.convert_ids_to_tokens(ids)
    assert pieces[1].startswith("▁") is expected  # legacy: a dummy prefix after every special token
