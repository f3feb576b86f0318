"""Training data: file formats, masks from every template, truncation, preflight and its command."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_plain_template_supervises_the_caption_and_its_end_only(processors):
    processor = processors["chatml"]
    caption = [{"role": "user", "content": "Describe the panel.\n<image>"}, {"role": "assistant", "content": "a panel"}]
    ids, labels = encode(caption, processor.tokenizer, "plain", "<image>", processor.tokens_per_image, 4096)
    assert _supervised_runs(ids, labels, processor.tokenizer) == ["a panel<|im_end|>"]
    assert "Describe" not in processor.tokenizer.decode(ids)


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
    full, _ = encode(CHAT, processor.tokenizer, "chat", "<image>", n, 4096)
    image_start = full.index(processor.image_token_id)
    with pytest.raises(SampleError, match="exceed max_length"):
        encode(CHAT, processor.tokenizer, "chat", "<image>", n, len(full) - 1, "skip")
    ids, labels = encode(CHAT, processor.tokenizer, "chat", "<image>", n, len(full) - 3, "truncate")
    assert len(ids) == len(full) - 3 and any(label != -100 for label in labels)
    with pytest.raises(SampleError, match="no token of the sample would carry loss"):
        encode(CHAT, processor.tokenizer, "chat", "<image>", n, image_start + n // 2, "truncate")


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
    found = {kind: [record_id for record_id, _ in ids] for kind, ids in report.problems.items()}
    assert found == {"missing_image": ["missing"], "corrupt_image": ["corrupt"], "bad_roles": ["roles"],
                     "image_count_mismatch": ["count"], "too_long": ["long"]}
    assert sorted(report.lengths) == [0, 1]
    assert "5 bad" in report.format() and "missing_image: 1 (ids: missing)" in report.format()
    with pytest.raises(DataError, match="5 of 7 records are bad"):
        enforce(report, 0.0, tmp_path)
    assert enforce(report, 0.8, tmp_path) == {"missing", "corrupt", "roles", "count", "long"}
    skipped = [json.loads(line) for line in (tmp_path / "skipped_records.jsonl").read_text().splitlines()]
    assert {s["id"]: s["problem"] for s in skipped}["count"] == "image_count_mismatch"


def test_check_command_prints_the_report_and_fails_on_bad_data(parts, bad_dataset):
    args = [sys.executable, "-m", "vlm.data", "check", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"model.vision_tower={parts['clip']}", f"model.language_model={parts['llama']}",
            f"data.path={bad_dataset / 'data.json'}", f"data.image_folder={bad_dataset}", "data.max_length=256"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 1
    assert "corrupt_image: 1 (ids: corrupt)" in result.stdout and "Traceback" not in result.stderr
    missing = subprocess.run([*args[:-3], "data.path=/nonexistent.json"], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip() == "error: data file /nonexistent.json does not exist"


@pytest.mark.parametrize("file, template", [("captions.json", "plain"), ("instruct.json", "chat")])
def test_synthetic_panels_pass_preflight(tmp_path, processors, file, template):
    from vlm.synth import write_dataset

    write_dataset(tmp_path, 4, seed=11, size=56)
    data = DataConfig(path=str(tmp_path / file), image_folder=str(tmp_path), template=template)
    report = check_records(load_records(data.path), processors["chatml"], data)
    assert not report.problems and len(report.lengths) == report.total == (4 if template == "plain" else 20)
