"""Training data: file formats, masks from every template, truncation, preflight and its command."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm import ModelConfig, build_vlm
from vlm.config import DataConfig
from vlm.data.formats import DataError, load_records
from vlm.data.preflight import check_records, enforce
from vlm.data.templates import SampleError, encode

ROOT = Path(__file__).resolve().parents[1]
CHAT = [
    {"role": "system", "content": "You inspect equipment."},
    {"role": "user", "content": "<image>\nIs the FAULT lamp on?"},
    {"role": "assistant", "content": "yes, it is lit"},
    {"role": "user", "content": "What is the asset code?"},
    {"role": "assistant", "content": "KX-4821"},
]


@pytest.fixture(scope="module")
def processors(parts):
    """Processors whose templates end turns differently: ChatML, Llama-3, LLaVA-1.5's vicuna_v1."""
    def make(lm: str, template: str | None = None):
        config = ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts[lm]), chat_template=template)
        return build_vlm(config)[1]

    return {"chatml": make("qwen2"), "llama3": make("llama"), "vicuna_v1": make("llama", "vicuna_v1")}


def _supervised_runs(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize("name", ["chatml", "llama3", "vicuna_v1"])
def test_loss_falls_exactly_on_assistant_replies_and_their_end(processors, name):
    processor = processors[name]
    tokenizer = processor.tokenizer
    ids, labels = encode(CHAT, tokenizer, "chat", "<image>", processor.tokens_per_image, 4096)
    end = tokenizer.eos_token  # each template ends a reply with the LM's end-of-turn token
    lead = " " if name == "vicuna_v1" else ""  # vicuna's "ASSISTANT:" prompt leaves the space to the reply
    assert _supervised_runs(ids, labels, tokenizer) == [lead + "yes, it is lit" + end, lead + "KX-4821" + end]
    # The ids are the rendering's own tokens: decoding them gives the template's text back.
    image_id = processor.image_token_id
    assert ids.count(image_id) == processor.tokens_per_image
    collapsed = [t for i, t in enumerate(ids) if t != image_id or ids[i - 1] != image_id]
    assert tokenizer.decode(collapsed, skip_special_tokens=False) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_vicuna_v1_renders_llava_1_5_format(processors):
    # Vicuna's own eos is </s>; the tiny Llama here ends turns with <|eot_id|>, and the template writes eos_token.
    text = processors["vicuna_v1"].tokenizer.apply_chat_template(CHAT[1:], tokenize=False)
    assert text == ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions. USER: <image>\nIs the FAULT lamp "
                    "on? ASSISTANT: yes, it is lit<|eot_id|>USER: What is the asset code? ASSISTANT: KX-4821<|eot_id|>")


def test_plain_template_is_image_caption_newline_with_loss_on_caption_and_newline(processors):
    processor = processors["chatml"]
    caption = [{"role": "user", "content": "Describe the panel.\n<image>"}, {"role": "assistant", "content": "a panel"}]
    ids, labels = encode(caption, processor.tokenizer, "plain", "<image>", processor.tokens_per_image, 4096)
    assert _supervised_runs(ids, labels, processor.tokenizer) == ["a panel\n"]
    # No BOS: this tokenizer adds none of its own (LLaVA keeps a BOS only where the tokenizer adds it).
    assert ids[:processor.tokens_per_image] == [processor.image_token_id] * processor.tokens_per_image
    assert processor.tokenizer.decode(ids[processor.tokens_per_image:]) == "a panel\n"


@pytest.mark.parametrize("name", ["chatml", "llama3", "vicuna_v1"])
def test_an_image_after_the_question_moves_to_the_front_of_its_turn(processors, name):
    processor = processors[name]
    last = [{"role": "user", "content": "What is the asset code?\n<image>  "}, {"role": "assistant", "content": "KX"}]
    first = [{"role": "user", "content": "<image>\nWhat is the asset code?"}, {"role": "assistant", "content": "KX"}]
    n = processor.tokens_per_image
    assert encode(last, processor.tokenizer, "chat", "<image>", n, 4096) == \
        encode(first, processor.tokenizer, "chat", "<image>", n, 4096)


def test_a_template_that_rewrites_replies_is_reported_not_zeroed(processors):
    tokenizer = processors["chatml"].tokenizer
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = saved.replace("message['content']", "message['content'] | upper")
        with pytest.raises(SampleError, match="changed the text of assistant turn 2"):
            encode(CHAT, tokenizer, "chat", "<image>", 4, 4096)
    finally:
        tokenizer.chat_template = saved


def test_truncation_never_cuts_inside_an_image_and_never_to_zero_loss(processors):
    processor = processors["llama3"]
    n = processor.tokens_per_image
    full, full_labels = encode(CHAT, processor.tokenizer, "chat", "<image>", n, 4096)
    image_start = full.index(processor.image_token_id)
    with pytest.raises(SampleError, match="exceed max_length"):
        encode(CHAT, processor.tokenizer, "chat", "<image>", n, len(full) - 1, "skip")
    ids, labels = encode(CHAT, processor.tokenizer, "chat", "<image>", n, len(full) - 3, "truncate")
    assert len(ids) == len(full) - 3 and any(label != -100 for label in labels)
    with pytest.raises(SampleError, match="truncating would cut an image"):
        encode(CHAT, processor.tokenizer, "chat", "<image>", n, image_start + n // 2, "truncate")
    first_supervised = next(k for k, label in enumerate(full_labels) if label != -100)
    with pytest.raises(SampleError, match="no token of the sample would carry loss after truncation"):
        encode(CHAT, processor.tokenizer, "chat", "<image>", n, first_supervised, "truncate")


def test_trailing_comma_is_reported_with_line_and_column(tmp_path):
    bad = tmp_path / "custom.json"
    bad.write_text('[\n  {"id": "1", "conversations": []},\n]\n')
    with pytest.raises(DataError, match=r"custom.json: line 3, column 1"):
        load_records(bad)


def _png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hugging_face_datasets_with_bytes_and_pil_images(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rows = {"id": ["a", "b"], "image": [_png_bytes((255, 0, 0)), _png_bytes((0, 0, 255))],
            "conversations": [[{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": c}]
                              for c in ("red", "blue")]}
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "rows.parquet"))
    parquet = load_records(tmp_path / "rows.parquet")
    assert [r.id for r in parquet] == ["a", "b"] and parquet[0].images == [rows["image"][0]]
    assert parquet[1].messages[1] == {"role": "assistant", "content": "blue"}

    pil = Dataset.from_dict({**rows, "image": [{"bytes": b, "path": None} for b in rows["image"]]},
                            features=Features({"id": Value("string"), "image": ImageFeature(),
                                               "conversations": [{"from": Value("string"), "value": Value("string")}]}))
    pil.save_to_disk(str(tmp_path / "saved"))
    saved = load_records(tmp_path / "saved")
    assert Image.open(io.BytesIO(saved[1].images[0])).getpixel((0, 0)) == (0, 0, 255)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    Image.new("RGB", (40, 40), "green").save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    turn = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a panel"}]
    records = [
        {"id": "good", "image": "ok.png", "conversations": turn},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "missing", "image": "nowhere.png", "conversations": turn},
        {"id": "corrupt", "image": "corrupt.png", "conversations": turn},
        {"id": "roles", "image": "ok.png", "conversations": [turn[0], turn[0], turn[1]]},
        {"id": "count", "image": ["ok.png", "ok.png"], "conversations": turn},
        {"id": "long", "image": "ok.png", "conversations": [turn[0], {"from": "gpt", "value": "word " * 400}]},
    ]
    (root / "data.json").write_text(json.dumps(records))
    return root


def test_preflight_names_each_bad_record_and_training_refuses(tmp_path, bad_dataset, processors):
    data = DataConfig(path=str(bad_dataset / "data.json"), image_folder=str(bad_dataset), max_length=256)
    report = check_records(load_records(data.path), processors["llama3"], data)
    found = {kind: [record_id for _, record_id, _ in ids] for kind, ids in report.problems.items()}
    assert found == {"missing_image": ["missing"], "corrupt_image": ["corrupt"], "bad_roles": ["roles"],
                     "image_count_mismatch": ["count"], "too_long": ["long"]}
    assert sorted(report.lengths) == [0, 1]
    assert "5 bad" in report.format() and "missing_image: 1 (ids: missing)" in report.format()
    with pytest.raises(DataError, match="5 of 7 records are bad"):
        enforce(report, 0.0, tmp_path)
    assert enforce(report, 0.8, tmp_path) == {2, 3, 4, 5, 6}  # record indices: ids need not be unique
    skipped = [json.loads(line) for line in (tmp_path / "skipped_records.jsonl").read_text().splitlines()]
    assert {s["id"]: (s["index"], s["problem"]) for s in skipped}["count"] == (5, "image_count_mismatch")


def test_check_command_prints_the_report_and_fails_on_bad_data(parts, bad_dataset):
    args = [sys.executable, "-m", "vlm.data", "check", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"model.vision_tower={parts['clip']}", f"model.language_model={parts['llama']}",
            f"data.path={bad_dataset / 'data.json'}", f"data.image_folder={bad_dataset}", "data.max_length=256"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 1
    assert "corrupt_image: 1 (ids: corrupt)" in result.stdout and "Traceback" not in result.stderr
    missing = subprocess.run([*args[:-3], "data.path=/nonexistent.json"], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip() == "error: data file /nonexistent.json does not exist"
    (bad_dataset / "empty.json").write_bytes(b"")
    empty = subprocess.run([*args[:-3], f"data.path={bad_dataset / 'empty.json'}"], capture_output=True, text=True)
    assert empty.returncode == 2
    assert empty.stderr.strip() == f"error: {bad_dataset / 'empty.json'}: no records (the data set is empty)"


@pytest.mark.parametrize("file, template", [("captions.json", "plain"), ("instruct.json", "chat")])
def test_synthetic_panels_pass_preflight(tmp_path, processors, file, template):
    from vlm.synth import write_dataset

    write_dataset(tmp_path, 4, seed=11, size=56)
    data = DataConfig(path=str(tmp_path / file), image_folder=str(tmp_path), template=template)
    report = check_records(load_records(data.path), processors["chatml"], data)
    assert not report.problems and len(report.lengths) == report.total == (4 if template == "plain" else 20)


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def _turns(question: str = "<image>\nWhat is it?", reply: str = "a panel") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]


def test_duplicate_ids_are_flagged_and_training_uses_exactly_the_passed_records(tmp_path, bad_dataset, processors):
    from vlm.data.dataset import VLMDataset

    records = [{"id": "a", "image": "ok.png", "conversations": _turns(reply="first")},
               {"id": "a", "image": "ok.png", "conversations": _turns(reply="second")},
               {"id": "b", "image": "nowhere.png", "conversations": _turns()},
               {"id": "b", "image": "ok.png", "conversations": _turns(reply="fourth")},
               {"id": "c", "conversations": _turns("Hi", "Hello")}]
    data = DataConfig(path=str(_write(tmp_path / "dups.json", records)), image_folder=str(bad_dataset))
    processor = processors["llama3"]
    loaded = load_records(data.path)
    report = check_records(loaded, processor, data)
    # The first record of an id is checked (and trained if good); each later one is a duplicate.
    assert {kind: [index for index, _, _ in found] for kind, found in report.problems.items()} == \
        {"duplicate_id": [1, 3], "missing_image": [2]}
    assert sorted(report.lengths) == [0, 4] and len(report.lengths) + len(report.bad) == report.total == 5
    assert report.format().startswith("preflight: 5 records, 2 good, 3 bad")
    skip = enforce(report, 0.6, tmp_path)
    dataset = VLMDataset(loaded, processor, data, report.lengths, skip_ids=skip)
    trained = [processor.tokenizer.decode(dataset[i]["input_ids"][dataset[i]["labels"] != -100]) for i in range(2)]
    assert [dataset[i]["id"] for i in range(2)] == ["a", "c"] and "first" in trained[0] and "Hello" in trained[1]


@pytest.mark.parametrize("question, reply", [("<image>\nWhat is it?", ""), ("<image>\nWhat is it?", " \n "),
                                             ("", "a panel"), ("  ", "a panel")])
def test_empty_questions_and_replies_are_flagged(tmp_path, bad_dataset, processors, question, reply):
    image = {"image": "ok.png"} if "<image>" in question else {}
    data = DataConfig(path=str(_write(tmp_path / "empty.json", [{"id": "e", **image,
                                                                 "conversations": _turns(question, reply)}])),
                      image_folder=str(bad_dataset))
    report = check_records(load_records(data.path), processors["llama3"], data)
    assert list(report.problems) == ["empty_turn"] and not report.lengths


@pytest.mark.parametrize("content", [b"[]", b"", b"  \n"])
def test_an_empty_data_set_is_one_clear_error(tmp_path, content):
    (tmp_path / "empty.json").write_bytes(content)
    with pytest.raises(DataError, match=r"empty.json: no records \(the data set is empty\)"):
        load_records(tmp_path / "empty.json")


def test_a_hugging_face_dataset_without_the_image_column_names_the_columns_found(tmp_path):
    from datasets import Dataset

    rows = {"id": ["a"], "picture": [_png_bytes((255, 0, 0))], "conversations": [_turns()]}
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(DataError, match=r"rows.parquet: no image column 'image' \(columns: id, picture, conversations"):
        load_records(tmp_path / "rows.parquet")
    assert load_records(tmp_path / "rows.parquet", image_column="picture")[0].images == rows["picture"]


def test_a_byte_order_mark_is_accepted_and_non_utf8_names_the_line(tmp_path):
    records = [{"id": "1", "conversations": _turns("Hi", "Hello")}, {"id": "2", "conversations": _turns("Hé", "Ho")}]
    for suffix, text in ((".json", json.dumps(records)), (".jsonl", "\n".join(json.dumps(r) for r in records))):
        (tmp_path / f"bom{suffix}").write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [r.id for r in load_records(tmp_path / f"bom{suffix}")] == ["1", "2"]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (tmp_path / "latin1.jsonl").write_bytes("\n".join(lines).encode("latin-1"))
    column = lines[1].encode("latin-1").index(b"\xe9") + 1
    with pytest.raises(DataError, match=rf"latin1.jsonl: line 2: not UTF-8 text \(byte 0xe9 at byte {column} of"):
        load_records(tmp_path / "latin1.jsonl")


def test_image_paths_leaving_the_image_folder_are_flagged_unless_allowed(tmp_path, processors):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for where in (folder / "ok.png", tmp_path / "outside.png"):
        Image.new("RGB", (20, 20), "blue").save(where)
    records = [{"id": "inside", "image": "sub/../ok.png", "conversations": _turns()},
               {"id": "dotdot", "image": "../outside.png", "conversations": _turns()},
               {"id": "absolute", "image": str(tmp_path / "outside.png"), "conversations": _turns()}]
    data = DataConfig(path=str(_write(tmp_path / "paths.json", records)), image_folder=str(folder))
    report = check_records(load_records(data.path), processors["llama3"], data)
    assert {kind: [i for _, i, _ in found] for kind, found in report.problems.items()} == \
        {"image_outside_folder": ["dotdot", "absolute"]}
    data.allow_outside_paths = True
    assert not check_records(load_records(data.path), processors["llama3"], data).problems


def test_truncated_records_are_counted_and_those_cut_in_an_image_are_bad(tmp_path, bad_dataset, processors):
    long_reply = "word " * 300
    records = [{"id": "long", "image": "ok.png", "conversations": _turns(reply=long_reply)},
               {"id": "image-late", "image": "ok.png",
                "conversations": [*_turns("Hi", long_reply), *_turns("<image>\nAnd this?", "a panel")]},
               {"id": "short", "image": "ok.png", "conversations": _turns()}]
    data = DataConfig(path=str(_write(tmp_path / "long.json", records)), image_folder=str(bad_dataset),
                      max_length=256, on_too_long="truncate")
    report = check_records(load_records(data.path), processors["llama3"], data)
    assert report.truncated == [(0, "long")] and report.lengths[0] == 256
    assert [(i, why) for i, _, why in report.problems["too_long"]] == [(1, report.problems["too_long"][0][2])]
    assert "truncating would cut an image" in report.problems["too_long"][0][2]
    assert report.format().startswith("preflight: 3 records, 2 good (1 truncated to data.max_length), 1 bad")
    assert "truncated: 1 (ids: long)" in report.format()


def test_training_pictures_use_data_image_aspect_and_the_feature_cache_keys_it(tmp_path, tiny_model):
    from vlm.data.cache import FeatureCache
    from vlm.data.dataset import VLMDataset

    model, processor = tiny_model
    picture = Image.new("RGB", (80, 40), "white")
    picture.paste(Image.new("RGB", (10, 40), "red"), (0, 0))  # a red edge that a center crop cuts away
    picture.save(tmp_path / "wide.png")
    path = _write(tmp_path / "one.json", [{"id": "w", "image": "wide.png", "conversations": _turns()}])
    pixels = {}
    for aspect in (None, "crop"):
        data = DataConfig(path=str(path), image_folder=str(tmp_path), image_aspect=aspect)
        records = load_records(path)
        report = check_records(records, processor, data)
        pixels[aspect] = VLMDataset(records, processor, data, report.lengths)[0]["pixel_values"]
    assert processor.image_aspect == "pad"
    assert torch.equal(pixels[None], processor.preprocess_images([picture], aspect="pad"))
    assert torch.equal(pixels["crop"], processor.preprocess_images([picture], aspect="crop"))
    assert not torch.equal(pixels[None], pixels["crop"])
    folders = {aspect: FeatureCache.folder_for(model, processor, tmp_path, aspect) for aspect in (None, "pad", "crop")}
    assert folders[None] == folders["pad"] != folders["crop"]


def test_llava_recipe_crops_stage1_pictures_pads_stage2_and_truncates_long_records():
    import re

    from vlm.config import load_config

    yaml_file = ROOT / "configs" / "llava-1.5-7b.yaml"
    stage1 = load_config(yaml_file)
    assert (stage1.data.template, stage1.data.image_aspect, stage1.model.image_aspect) == ("plain", "crop", "pad")
    assert (stage1.data.on_too_long, stage1.data.max_length) == ("truncate", 2048)
    # The stage-2 command written in the file's comments (its continuation lines), as a user would paste it.
    command = [line for line in yaml_file.read_text().splitlines() if line.startswith("#     ")]
    overrides = [word for line in command for word in re.findall(r"\S+=\S+", line)]
    stage2 = load_config(yaml_file, overrides)
    assert (stage2.stage, stage2.data.template, stage2.data.image_aspect) == ("instruct", "chat", None)
    assert stage2.data.on_too_long == "truncate" and stage2.data.path.endswith("llava_v1_5_mix665k.json")


def test_collate_joins_equal_features_as_one_tensor_and_keeps_ragged_ones_a_flat_list():
    from vlm.data.dataset import collate

    ids = {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6])}
    fixed = [{"id": "a", **ids, "vision_features": torch.randn(1, 4, 8)},
             {"id": "b", **ids, "vision_features": torch.randn(2, 4, 8)}]
    batch = collate(fixed, pad_token_id=0)
    assert torch.equal(batch["vision_features"], torch.cat([s["vision_features"] for s in fixed]))
    assert batch["spatial_shapes"] is None and batch["pixel_values"] is None
    # A NaFlex tower's cached features: one record with a 15-token image, one with a 12- and a 15-token image.
    ragged = [{"id": "a", **ids, "vision_features": torch.randn(1, 15, 8)},
              {"id": "b", **ids, "vision_features": [torch.randn(12, 8), torch.randn(15, 8)]}]
    batch = collate(ragged, pad_token_id=0)
    assert [len(image) for image in batch["vision_features"]] == [15, 12, 15]
    assert torch.equal(batch["vision_features"][2], ragged[1]["vision_features"][1])
    pixels = [{"id": "a", **ids, "pixel_values": torch.randn(1, 16, 588), "spatial_shapes": torch.tensor([[5, 3]])},
              {"id": "b", **ids, "pixel_values": torch.randn(2, 16, 588), "spatial_shapes": torch.tensor([[2, 6], [4, 4]])}]
    batch = collate(pixels, pad_token_id=0)
    assert batch["spatial_shapes"].tolist() == [[5, 3], [2, 6], [4, 4]] and batch["pixel_values"].shape == (3, 16, 588)
