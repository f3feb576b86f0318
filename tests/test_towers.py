"""Every tower family on a tiny random-weight model: prefix tokens known from the model, features equal to the
encoder's own hidden state at the selected layer, slots matching tokens, generation, training, save/load, export."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlm import ModelConfig, build_vlm, load_pretrained
from vlm.config import from_dict
from vlm.hf_llava import ExportError, export_llava
from vlm.testing import TOWER_FAMILIES, tiny_tower

PREFIX = {"clip": 1, "siglip": 0, "dinov2": 1, "dinov2_registers": 5, "siglip2_naflex": 0}
SIZES = [(200, 300), (300, 100)]  # width x height: tall, wide


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("towers")
    made = {family: tiny_tower(root / family, family) for family in TOWER_FAMILIES}
    made["siglip_p16"] = tiny_tower(root / "siglip_p16", "siglip", image_size=64, patch_size=16, seed=2)
    return made


def _pictures() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(3)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
            for w, h in SIZES]


def _own_features(tower, inputs: dict, select: str) -> list[torch.Tensor]:
    """What the encoder itself gives, image by image, at layer -2 (or its pooled output)."""
    encoder, found = tower.encoder, []
    for i in range(len(inputs["pixel_values"])):
        pixels = inputs["pixel_values"][i:i + 1]
        if "spatial_shapes" in inputs:
            length = int(inputs["spatial_shapes"][i].prod())
            out = encoder(pixels[:, :length], pixel_attention_mask=torch.ones(1, length, dtype=torch.long),
                          spatial_shapes=inputs["spatial_shapes"][i:i + 1], output_hidden_states=True)
        else:
            out = encoder(pixels, output_hidden_states=True)
        hidden = out.pooler_output[:, None] if select == "pooled" else out.hidden_states[-2]
        found.append(hidden[0, PREFIX[tower_family(tower)]:] if select == "patch" else hidden[0])
    return found


def tower_family(tower) -> str:
    names = {"CLIPVisionModel": "clip", "SiglipVisionModel": "siglip", "Dinov2Model": "dinov2",
             "Dinov2WithRegistersModel": "dinov2_registers", "Siglip2VisionModel": "siglip2_naflex"}
    return names[type(tower.encoder).__name__]


@pytest.mark.parametrize("select", ["patch", "cls_patch", "pooled"])
@pytest.mark.parametrize("family", TOWER_FAMILIES)
def test_features_are_the_encoders_own_and_fill_the_slots(towers, parts, family, select):
    model, processor = build_vlm(ModelConfig(vision_tower=str(towers[family]), language_model=str(parts["llama"]),
                                             vision_feature_select=select))
    assert model.vision_tower.prefix_tokens == PREFIX[family]
    inputs = processor(images=_pictures(), text=["<image>\nwhat is it ?", "a <image> b"], return_tensors="pt")
    features = model.vision_tower(inputs["pixel_values"], inputs.get("spatial_shapes"))
    own = _own_features(model.vision_tower, inputs, select)
    for ours, theirs in zip(features, own, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    slots = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert slots == [len(f) for f in own]
    assert slots == [processor.image_tokens_for(*picture.size) for picture in _pictures()]  # from headers alone
    if family == "siglip2_naflex" and select != "pooled":  # each image keeps its shape: a tall and a wide grid
        assert inputs["spatial_shapes"].tolist() == [[5, 3], [2, 6]] and slots == [15, 12]
    elif select != "pooled":
        grid = 4  # 56-px pictures, 14-px patches (DINOv2's config says 70 px; its processor crops to 56)
        assert slots == [grid * grid + (PREFIX[family] if select == "cls_patch" else 0)] * 2
    else:
        assert slots == [1, 1]
    with torch.no_grad():
        model(**inputs)  # the LM takes them


@pytest.mark.parametrize("family", [*TOWER_FAMILIES, "fused"])
def test_generation_training_and_save_load_keep_the_features(tmp_path, towers, parts, family):
    tower = [str(towers["dinov2"]), str(towers["siglip_p16"])] if family == "fused" else str(towers[family])
    model, processor = build_vlm(ModelConfig(vision_tower=tower, language_model=str(parts["llama"])))
    inputs = processor(images=_pictures(), text=["<image>\nthe gauge reads 42 .", "<image>\nthe fault lamp is on ."],
                       return_tensors="pt")
    new = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert new.shape == (2, inputs["input_ids"].shape[1] + 3)

    optimizer = torch.optim.SGD(model.projector.parameters(), lr=0.5)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    losses = []
    for _ in range(3):  # one batch holding both pictures (NaFlex: 15 and 12 visual tokens)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.save_pretrained(tmp_path / "saved", processor, full=True)
    loaded, loaded_processor = load_pretrained(tmp_path / "saved")
    again = loaded_processor(images=_pictures(), text=["<image>\nthe gauge reads 42 .", "<image>\nthe fault lamp is on ."],
                             return_tensors="pt")
    assert again["input_ids"].tolist() == inputs["input_ids"].tolist()
    torch.testing.assert_close(again["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**again).logits, model(**inputs).logits)


def test_fused_towers_concatenate_each_towers_patch_features(towers, parts):
    model, processor = build_vlm(ModelConfig(vision_tower=[str(towers["dinov2"]), str(towers["siglip_p16"])],
                                             language_model=str(parts["llama"])))
    dino, dino_processor = build_vlm(ModelConfig(vision_tower=str(towers["dinov2"]), language_model=str(parts["llama"])))
    siglip, _ = build_vlm(ModelConfig(vision_tower=str(towers["siglip_p16"]), language_model=str(parts["llama"])))
    pixels = processor.preprocess_images(_pictures())
    assert pixels.shape == (2, 6, 64, 64)  # DINOv2 at 56 px (14-px patches), SigLIP at 64 (16-px): one 4x4 grid
    fused = model.vision_tower(pixels)
    assert fused.shape == (2, 16, 64) and model.config.tokens_per_image == 16
    torch.testing.assert_close(fused[..., :32], dino.vision_tower(pixels[:, :3, :56, :56]))
    torch.testing.assert_close(fused[..., 32:], siglip.vision_tower(pixels[:, 3:, :, :]))
    # Each preprocessing is the tower's own: ImageNet normalisation for DINOv2, [-1, 1] for SigLIP.
    torch.testing.assert_close(pixels[:, :3, :56, :56], dino_processor.preprocess_images(_pictures()))
    assert not pixels[:, :3, 56:].any() and not pixels[:, :3, :, 56:].any()


def test_fused_towers_refuse_different_grids_and_a_lone_list(towers, parts):
    with pytest.raises(ValueError, match="share one patch grid.*56px / patch 14 = 4, 56px / patch 16 = 3"):
        build_vlm(ModelConfig(vision_tower=[str(towers["dinov2"]), str(towers["siglip_p16"])], image_size=56,
                              language_model=str(parts["llama"])))
    with pytest.raises(ValueError, match="a list fuses two or more towers"):
        from_dict(ModelConfig, {"vision_tower": ["a"]})
    assert from_dict(ModelConfig, {"vision_tower": ["a", "b"]}).vision_tower == ["a", "b"]


def test_dinov2_exports_to_llava_and_back(tmp_path, towers, parts):
    ours, processor = build_vlm(ModelConfig(vision_tower=str(towers["dinov2"]), language_model=str(parts["llama"]),
                                            image_aspect="crop"))
    export_llava(ours, processor, tmp_path / "llava")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    their_processor = AutoProcessor.from_pretrained(tmp_path / "llava", backend="pil")
    their_processor.tokenizer.padding_side = "left"  # as ours pads, for generation
    prompts = ["<image>\nwhat is it ?", "the gauge reads\n<image>"]
    our_inputs = processor(images=_pictures(), text=prompts, return_tensors="pt")
    their_inputs = their_processor(images=_pictures(), text=prompts, return_tensors="pt", padding=True)
    assert our_inputs["input_ids"].tolist() == their_inputs["input_ids"].tolist()
    with torch.no_grad():
        ours_logits, their_logits = ours(**our_inputs).logits, theirs(**their_inputs).logits
    assert (ours_logits - their_logits)[our_inputs["attention_mask"].bool()].abs().max() <= 1e-4
    back, back_processor = load_pretrained(tmp_path / "llava")
    assert back.config.tokens_per_image == 16 and back.vision_tower.prefix_tokens == 1
    with torch.no_grad():
        torch.testing.assert_close(back(**back_processor(images=_pictures(), text=prompts)).logits, ours_logits,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["dinov2_registers", "siglip2_naflex", "fused"])
def test_export_refuses_what_llava_cannot_hold(tmp_path, towers, parts, family):
    tower = [str(towers["dinov2"]), str(towers["siglip_p16"])] if family == "fused" else str(towers[family])
    model, processor = build_vlm(ModelConfig(vision_tower=tower, language_model=str(parts["llama"])))
    with pytest.raises(ExportError, match="cannot export"):
        export_llava(model, processor, tmp_path / "llava")


@pytest.mark.parametrize(("name", "tower"), [
    ("siglip2-so400m.yaml", "google/siglip2-so400m-patch14-384"),
    ("siglip2-naflex.yaml", "google/siglip2-so400m-patch16-naflex"),
    ("dinov2-large.yaml", "facebook/dinov2-large"),
    ("dinov2-siglip.yaml", ["facebook/dinov2-large", "google/siglip-so400m-patch14-384"])])
def test_tower_configs_load(name, tower):
    from pathlib import Path

    from vlm.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert config.model.vision_tower == tower and config.model.vision_feature_layer == -2


@pytest.mark.parametrize("family", ["siglip2_naflex", "dinov2"])
def test_a_multi_turn_chat_keeps_the_pictures_own_token_count(towers, parts, family):
    """chat.py's session: the picture's slots follow its own grid (NaFlex) on every turn, the cache carries on."""
    from vlm.session import ChatSession

    model, processor = build_vlm(ModelConfig(vision_tower=str(towers[family]), language_model=str(parts["llama"])))
    picture = _pictures()[1]
    session = ChatSession(model, processor, picture, max_new_tokens=3)
    session.ask("what is the asset code ?")
    slots = int((session.token_ids == model.config.image_token_id).sum())
    alone = processor(images=[picture], text=["<image>"], return_tensors="pt")
    assert slots == int((alone["input_ids"] == model.config.image_token_id).sum())
    session.ask("is the fault lamp on ?")
    assert int((session.token_ids == model.config.image_token_id).sum()) == slots
    assert session.full_reencodes == 0


def test_training_samples_take_each_pictures_own_slot_count(parts):
    from vlm.data.templates import encode

    _, processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts["llama"])))
    messages = [{"role": "user", "content": "<image>\nthe first"}, {"role": "assistant", "content": "a gauge"},
                {"role": "user", "content": "<image>\nthe second"}, {"role": "assistant", "content": "a lamp"}]
    ids, labels = encode(messages, processor.tokenizer, "chat", "<image>", [15, 12], 4096)
    image_id = processor.image_token_id
    runs = [len(run) for run in "".join("x" if t == image_id else " " for t in ids).split()]
    assert runs == [15, 12] and all(label == -100 for token, label in zip(ids, labels, strict=True) if token == image_id)


def _naflex_data(root) -> tuple:
    """Pictures of two shapes (a tall 5x3 and a wide 2x6 patch grid: 15 and 12 slots), as caption and chat records."""
    from pathlib import Path

    root = Path(root)
    (root / "images").mkdir(parents=True)
    captions, chats = [], []
    for index, picture in enumerate(_pictures() * 2):
        picture.save(root / "images" / f"{index}.png")
        captions.append({"id": f"c{index}", "image": f"images/{index}.png", "conversations": [
            {"from": "human", "value": "<image>\ndescribe it ."}, {"from": "gpt", "value": f"the gauge reads {index}"}]})
        chats.append({"id": f"q{index}", "image": f"images/{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the asset code ?"}, {"from": "gpt", "value": "KX-4821"},
            {"from": "human", "value": "is the fault lamp on ?"}, {"from": "gpt", "value": "yes"}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instruct.json").write_text(json.dumps(chats))
    return root / "captions.json", root / "instruct.json"


@pytest.mark.parametrize("cached", [False, True])
def test_naflex_trains_both_stages_with_differently_shaped_pictures_in_one_batch(tmp_path, towers, parts, cached):
    """train(): each batch of 4 holds both grids (15 and 12 visual tokens), as pixels or as cached features."""
    import math

    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from vlm.config import load_config
    from vlm.train.loop import train

    captions, instruct = _naflex_data(tmp_path / "data")
    common = [f"model.vision_tower={towers['siglip2_naflex']}", f"model.language_model={parts['llama']}",
              f"data.image_folder={tmp_path / 'data'}", "seed=0", "train.warmup_ratio=0", "train.batch_size=4",
              "train.max_steps=2", "train.lr=5e-3", f"data.cache_features={str(cached).lower()}"]
    stage1_config = load_config(None, [*common, "stage=align", f"data.path={captions}", "data.template=plain",
                                       f"output_dir={tmp_path / 's1'}"])
    set_seed(0)
    initial = build_vlm(stage1_config.model)[0].projector.state_dict()
    stage1 = train(stage1_config)
    stage2 = train(load_config(None, [*common, "stage=instruct", f"init_from={stage1}", f"data.path={instruct}",
                                      "train.lora_r=4", "train.lora_alpha=8", f"output_dir={tmp_path / 's2'}"]))
    projectors = [initial, load_file(stage1 / "projector.safetensors"), load_file(stage2 / "projector.safetensors")]
    for before, after in zip(projectors, projectors[1:], strict=False):
        assert any(not torch.equal(before[name], after[name]) for name in before)
    for out in ("s1", "s2"):
        losses = [h["loss"] for h in json.loads((tmp_path / out / "history.json").read_text())]
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    if cached:  # each picture's features stored at its own length
        from vlm.data.cache import FeatureCache

        cache = FeatureCache(next(p for p in (tmp_path / "s1" / "feature_cache").iterdir()))
        assert sorted({len(cache[key]) for key in cache.index}) == [12, 15]


def test_naflex_preflight_length_is_the_encoded_samples_own(tmp_path, towers, parts):
    """The preflight counts each picture's slots from its header (an EXIF-turned JPEG too) as the sample has them."""
    from vlm.config import DataConfig
    from vlm.data.dataset import VLMDataset, collate
    from vlm.data.formats import load_records
    from vlm.data.preflight import check_records

    captions, _ = _naflex_data(tmp_path)
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # stored 300x100, shown turned to 100x300
    _pictures()[1].save(tmp_path / "images" / "turned.jpg", exif=exif)
    records = json.loads(captions.read_text())
    records.append({**records[0], "id": "turned", "image": "images/turned.jpg"})
    captions.write_text(json.dumps(records))
    _, processor = build_vlm(ModelConfig(vision_tower=str(towers["siglip2_naflex"]),
                                         language_model=str(parts["llama"])))
    data = DataConfig(path=str(captions), image_folder=str(tmp_path), template="plain")
    loaded = load_records(captions)
    report = check_records(loaded, processor, data)
    dataset = VLMDataset(loaded, processor, data, report.lengths)
    samples = [dataset[i] for i in range(len(dataset))]
    assert [len(s["input_ids"]) for s in samples] == [report.lengths[i] for i in range(len(records))]
    slots = [int((s["input_ids"] == processor.image_token_id).sum()) for s in samples]
    assert slots == [15, 12, 15, 12, 6 * 2]  # the turned picture is tall: 6 rows of 2
    batch = collate(samples, processor.tokenizer.pad_token_id)
    assert batch["spatial_shapes"].tolist() == [[5, 3], [2, 6], [5, 3], [2, 6], [6, 2]]
    assert batch["pixel_values"].shape[0] == 5
