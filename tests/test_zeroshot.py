"""Zero-shot labels from a tower's text half: probabilities equal to CLIPModel / SiglipModel run directly,
templates, folders, labels files, one-line errors; the panels evaluation end to end; the demo's saved tower."""

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPModel,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

from eval import zeroshot as panels_eval
from vlm.synth import write_dataset
from vlm.testing import tiny_tower
from vlm.zeroshot import SETTINGS_FILE, load_zero_shot, main, write_settings

WORDS = "a an the of photo panel cracked intact red green blue lamp on off with no warning label damage".split()
LABELS = ["a red panel", "a green panel", "a blue panel"]
EOS_ID = 99


def word_tokenizer(out_dir, max_length: int) -> None:
    """A word-level tokenizer that ends every text with eos, as CLIP's and SigLIP's do; ids below 100."""
    vocab = {"<pad>": 0, "<unk>": 1, **{word: i + 2 for i, word in enumerate(WORDS)}, "</s>": EOS_ID}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                            model_max_length=max_length).save_pretrained(out_dir)


def tiny_siglip(out_dir, image_size: int = 56) -> None:
    """A whole SiglipModel (text half too) with a bias and scale that matter, its image processor and tokenizer."""
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=None, eos_token_id=EOS_ID)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=14)
    torch.manual_seed(2)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.5)
    model.save_pretrained(out_dir)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    word_tokenizer(out_dir, 16)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    clip = tiny_tower(root / "clip", "clip", full_clip=True, seed=3)
    whole = CLIPModel.from_pretrained(clip)
    with torch.no_grad():
        whole.logit_scale.fill_(3.0)  # not the init value: the checkpoint's own must be read
    whole.config.text_config.eos_token_id, whole.config.text_config.bos_token_id = EOS_ID, None  # our tokenizer's
    whole.save_pretrained(clip)
    word_tokenizer(clip, 16)
    tiny_siglip(root / "siglip")
    return {"clip": clip, "siglip": root / "siglip", "vision_only": tiny_tower(root / "vision", "clip")}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    for name, colour, size in (("b_red.png", (220, 30, 30), (70, 50)), ("a_green.jpg", (30, 200, 40), (56, 56)),
                               ("c_blue.png", (20, 40, 230), (40, 90))):
        Image.new("RGB", size, colour).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def direct(family: str, tower, files, texts: list[str]) -> torch.Tensor:
    """transformers' own model, processor and tokenizer as their docs run them: probabilities [images, texts]."""
    model = (CLIPModel if family == "clip" else SiglipModel).from_pretrained(tower).eval()
    tokenizer = AutoTokenizer.from_pretrained(tower)
    padding = True if family == "clip" else "max_length"  # SigLIP is trained on texts padded to full length
    text = tokenizer(texts, padding=padding, **({} if family == "clip" else {"max_length": 16}), return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(tower, backend="pil")(
        [Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(**text, pixel_values=pixels).logits_per_image
    return logits.softmax(-1) if family == "clip" else logits.sigmoid()


def run_json(capsys, *argv) -> list[dict]:
    assert main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def as_matrix(results: list[dict], labels: list[str]) -> torch.Tensor:
    return torch.tensor([[next(e["probability"] for e in r["labels"] if e["label"] == label) for label in labels]
                         for r in results])


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_probabilities_equal_transformers_own_model(towers, pictures, capsys, family):
    files = sorted(pictures.glob("*.png"))
    results = run_json(capsys, "--tower", towers[family], "--image", *files, "--labels", *LABELS)
    expected = direct(family, towers[family], files, LABELS)
    assert torch.allclose(as_matrix(results, LABELS), expected, atol=1e-5)
    assert {r["activation"] for r in results} == {"softmax" if family == "clip" else "sigmoid"}
    for result in results:  # ranked, best first
        probabilities = [e["probability"] for e in result["labels"]]
        assert probabilities == sorted(probabilities, reverse=True)
    if family == "clip":
        assert torch.allclose(as_matrix(results, LABELS).sum(1), torch.ones(len(files)), atol=1e-5)


def test_siglip_scores_use_its_bias_and_can_be_read_as_softmax(towers, pictures, capsys):
    files = [pictures / "b_red.png"]
    scorer = load_zero_shot(towers["siglip"])
    assert scorer.activation == "sigmoid" and scorer.logit_bias == pytest.approx(-1.5)
    results = run_json(capsys, "--tower", towers["siglip"], "--image", *files, "--labels", *LABELS,
                       "--activation", "softmax")
    sigmoid = direct("siglip", towers["siglip"], files, LABELS)
    assert torch.allclose(as_matrix(results, LABELS), torch.logit(sigmoid.double()).softmax(-1).float(), atol=1e-5)


def test_folder_labels_file_and_template(towers, pictures, tmp_path, capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# colours\nred panel\n\ngreen panel\nblue panel\n")
    results = run_json(capsys, "--tower", towers["clip"], "--image", pictures, "--labels-file", labels_file,
                       "--template", "a photo of a {}", "--top", "2")
    files = [pictures / "a_green.jpg", pictures / "b_red.png", pictures / "c_blue.png"]  # the images, sorted
    assert [r["image"] for r in results] == [str(f) for f in files]
    assert all(len(r["labels"]) == 2 for r in results)
    expected = direct("clip", towers["clip"], files, ["a photo of a red panel", "a photo of a green panel",
                                                      "a photo of a blue panel"])
    for result, row in zip(results, expected, strict=True):
        best = row.argsort(descending=True)[:2]
        assert [e["label"] for e in result["labels"]] == [["red panel", "green panel", "blue panel"][i] for i in best]
        assert [e["probability"] for e in result["labels"]] == pytest.approx(row[best].tolist(), abs=1e-5)


def test_templates_are_averaged_as_prompt_ensembles(towers, pictures):
    scorer = load_zero_shot(towers["clip"])
    templates = ["a photo of {}", "the {} panel"]
    model, tokenizer = scorer.model, AutoTokenizer.from_pretrained(towers["clip"])
    with torch.no_grad():
        per_template = [torch.nn.functional.normalize(model.get_text_features(
            **tokenizer([t.replace("{}", w) for w in ("red", "blue")], padding=True, return_tensors="pt")
        ).pooler_output, dim=-1) for t in templates]
    mean = torch.nn.functional.normalize(per_template[0] + per_template[1], dim=-1)
    assert torch.allclose(scorer.embed_labels(["red", "blue"], templates), mean, atol=1e-6)
    image = [Image.open(pictures / "b_red.png").convert("RGB")]
    single = scorer.score(image, ["red", "blue"], templates[:1])
    assert not torch.allclose(scorer.score(image, ["red", "blue"], templates), single, atol=1e-4)


OK = ["--tower", "{clip}", "--image", "{red}", "--labels", "a", "b"]


@pytest.mark.parametrize("argv, message", [
    (["--tower", "{vision}", "--image", "{red}", "--labels", "a", "b"],
     "holds only a vision model (CLIPVisionModel), no text tower"),
    (OK[:3] + ["{pictures}/nope.png"] + OK[4:], "image {pictures}/nope.png does not exist"),
    (OK[:3] + ["{pictures}/notes.txt"] + OK[4:], "image {pictures}/notes.txt cannot be read"),
    (OK[:3] + ["{empty}"] + OK[4:], "folder {empty} holds no images"),
    (OK[:4] + ["--labels-file", "{empty}/missing.txt"], "labels file {empty}/missing.txt does not exist"),
    (OK[:5] + ["a", "a"], "label 'a' is given more than once"),
    (OK[:5] + ["only one"], "a softmax over one label is always 1"),
    (OK + ["--template", "a photo of"], "must hold exactly one {{}}"),
    (OK + ["--activation", "tanh"], "invalid choice: 'tanh'"),
    (OK + ["--labels-file", "x.txt"], "not allowed with argument --labels"),
])
def test_bad_input_is_one_line_and_exit_2(towers, pictures, tmp_path, capsys, argv, message):
    names = dict(vision=towers["vision_only"], clip=towers["clip"], red=pictures / "b_red.png", pictures=pictures,
                 empty=tmp_path)
    assert main([part.format(**names) for part in argv]) == 2
    error = capsys.readouterr().err  # transformers' loading bar may come first, on its own line
    assert "Traceback" not in error and [line for line in error.splitlines() if "error" in line] == [
        error.splitlines()[-1]]
    assert error.splitlines()[-1].startswith("vlm.zeroshot: error: ") and message.format(**names) in error


def test_settings_file_sets_the_activation_and_bias_of_a_clip_model(towers, tmp_path):
    import shutil

    tower = shutil.copytree(towers["clip"], tmp_path / "clip")
    write_settings(tower, "sigmoid", -4.0)
    scorer = load_zero_shot(tower)
    assert (scorer.activation, scorer.logit_bias) == ("sigmoid", -4.0)
    (tower / SETTINGS_FILE).write_text('{"activation": "relu"}')
    with pytest.raises(ValueError, match="must hold"):
        load_zero_shot(tower)


def test_panels_evaluation_beside_the_vlm_end_to_end(towers, tiny_model, tmp_path, capsys):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "vlm", processor)
    with pytest.raises(ValueError, match="vlm/vision_tower holds only a vision model"):  # a model folder: its tower
        load_zero_shot(tmp_path / "vlm")
    write_dataset(tmp_path / "panels", 4, 7, 128)
    out = tmp_path / "out"
    assert panels_eval.main(["--panels", str(tmp_path / "panels"), "--model", str(tmp_path / "vlm"), "--tower",
                             str(towers["clip"]), "--out", str(out), "--limit", "3", "--max-new-tokens", "3",
                             "--save-to-model"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "zeroshot.json").read_text())
    assert json.loads((tmp_path / "vlm" / "results" / "zeroshot.json").read_text()) == result
    questions = [json.loads(line) for line in (tmp_path / "panels" / "questions.jsonl").read_text().splitlines()][:21]
    damaged = sum(q["category"] == "damage" and q["answer"] != "none" for q in questions)
    counts = {name: entry["zero_shot"]["n"] for name, entry in result["capabilities"].items()}
    assert counts == {"damage_present": 3, "damage_type": damaged, "lamp": 3, "warning": 3}
    for name, entry in result["capabilities"].items():
        assert entry["vlm"]["n"] == counts[name] and f"| {name} |" in printed
        low, high = entry["zero_shot"]["interval"]
        assert low <= entry["zero_shot"]["value"] <= high
    # The VLM answered exactly these questions, and its file scores again as given results.
    answered = [json.loads(line)["question_id"] for line in (out / "vlm" / "answers.jsonl").read_text().splitlines()]
    asked = [q["question_id"] for q in questions if q["category"] in ("damage", "lamp", "warning")]
    assert sorted(answered) == sorted(asked)
    again = tmp_path / "again"
    assert panels_eval.main(["--panels", str(tmp_path / "panels"), "--tower", str(towers["clip"]), "--limit", "3",
                             "--vlm-results", str(out / "vlm" / "metrics.json"), "--out", str(again)]) == 0
    assert json.loads((again / "zeroshot.json").read_text())["capabilities"] == result["capabilities"]
    # Results of other panels are refused, in one line.
    assert panels_eval.main(["--panels", str(tmp_path / "panels"), "--tower", str(towers["clip"]), "--limit", "2",
                             "--vlm-results", str(out / "vlm" / "metrics.json"), "--out", str(again)]) == 2
    assert "damage_present answers, these panels 2" in capsys.readouterr().err


def test_panel_questions_become_one_label_per_answer():
    damage = panel_eval_choices("What damage, if any, is at the top-center of the panel?", "damage")
    assert damage[-1] == ("none", "no damage at the top-center") and ("crack", "a crack at the top-center") in damage
    lamp = panel_eval_choices("Is the RUN lamp lit?", "lamp")
    assert lamp == [("on", "the RUN lamp on"), ("off", "the RUN lamp off")]
    assert [a for a, _ in panel_eval_choices("Is there a warning label on the panel?", "warning")] == ["yes", "no"]


def panel_eval_choices(text: str, category: str) -> list[tuple[str, str]]:
    return panels_eval.choices({"question_id": "q", "text": text, "category": category})


def test_demo_save_keeps_the_text_tower_the_vlm_still_reads(tmp_path, pictures):
    from tools.demo.contrastive import build_clip, image_processor, tokenize_captions
    from tools.demo.lm import corpus_texts, train_tokenizer
    from tools.demo.recipe import QUICK_SPEC, keep_text_tower
    from vlm.vision import load_vision_encoder

    write_dataset(tmp_path / "data", 3, 5, 128)
    tokenizer = train_tokenizer(corpus_texts(tmp_path / "data"), tmp_path / "lm", 640)
    torch.manual_seed(0)
    clip = build_clip(QUICK_SPEC, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        for parameter in clip.vision_model.parameters():  # build_clip zeroes some branches: give them weight
            parameter.add_(0.02 * torch.randn_like(parameter))
    clip.save_pretrained(tmp_path / "tower")
    image_processor(QUICK_SPEC).save_pretrained(tmp_path / "tower")
    write_settings(tmp_path / "tower", "sigmoid", -7.5)  # a tower trained with SigLIP's loss says so
    vision_dir = tmp_path / "model" / "vision_tower"  # what the VLM's fp16 save leaves
    load_vision_encoder(str(tmp_path / "tower")).to(torch.float16).save_pretrained(vision_dir)
    image_processor(QUICK_SPEC).save_pretrained(vision_dir)
    with pytest.raises(ValueError, match="no text tower"):
        load_zero_shot(vision_dir)

    keep_text_tower(tmp_path / "tower", tmp_path / "lm", vision_dir)
    encoder = load_vision_encoder(str(vision_dir))
    assert type(encoder).__name__ == "CLIPVisionModel"
    for name, tensor in encoder.state_dict().items():  # the VLM reads the very weights it was saved with
        assert torch.equal(tensor, clip.vision_model.state_dict()[name.removeprefix("vision_model.")].half().float())
    scorer = load_zero_shot(vision_dir)
    assert (scorer.activation, scorer.logit_bias) == ("sigmoid", -7.5)
    captions = ["Equipment panel AB-1234 with gauge at 42, RUN lit, no visible damage.", "a dent"]
    saved = CLIPModel.from_pretrained(vision_dir, dtype=torch.float32)
    with torch.no_grad():  # tokenized as the tower was trained: each caption ends in eos, padded on the right
        trained_way = saved.get_text_features(**tokenize_captions(tokenizer, captions)).pooler_output
    assert torch.allclose(scorer.embed_texts(captions), torch.nn.functional.normalize(trained_way, dim=-1), atol=1e-6)
