"""The demo recipe's parts: both contrastive losses on hand-checked cases, the per-patch fact targets,
the scorer's rules, the corpus tokenizer, and a tiny tower and LM saved and loaded the way the VLM loads them."""

import copy
import json
import math
import random

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from vlm.demo.contrastive import (
    IGNORE,
    SPOTS,
    Contrastive,
    SpotHeads,
    TowerSpec,
    build_clip,
    caption_of,
    clip_loss,
    evaluate_fields,
    field_accuracy,
    image_processor,
    mean_patch_token,
    perturbations,
    save_tower,
    seed_query_projector,
    siglip_loss,
    spot_targets,
    train_tower,
    where_loss,
    zero_shot,
)
from vlm.demo.lm import corpus_texts, pack, pretrain_lm, train_tokenizer
from vlm.demo.recipe import folder_megabytes, save_fp16, stage2_records
from vlm.demo.score import judge
from vlm.model import load_pretrained
from vlm.processor import load_image_processor
from vlm.projector import QueryPoolProjector
from vlm.synth import write_dataset
from vlm.synth.panels import generate_panel, make_report
from vlm.vision import VisionTower, load_vision_encoder

SPEC = TowerSpec(image_size=64, patch_size=16, width=64, layers=1, text_width=64, text_layers=1, embed_dim=16)


def test_clip_loss_by_hand():
    # Unit embeddings e1, e2 and scale 1: logits [[1, 0], [0, 1]]; each row's CE is log(1 + e^-1).
    eye = torch.eye(2)
    assert clip_loss(eye, eye, torch.tensor(0.0)).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # Mismatched pairs cost more than matched ones; a large scale makes the matched loss vanish.
    swapped = eye.flip(0)
    assert clip_loss(eye, swapped, torch.tensor(0.0)) > clip_loss(eye, eye, torch.tensor(0.0))
    assert clip_loss(eye, eye, torch.tensor(math.log(100.0))).item() < 1e-6


def test_siglip_loss_by_hand():
    # Logits [[1, 0], [0, 1]] + b with b = 0: two positives at -log sigmoid(1), two negatives at -log sigmoid(0).
    eye = torch.eye(2)
    expected = (2 * math.log(1 + math.exp(-1)) + 2 * math.log(2)) / 2
    assert siglip_loss(eye, eye, torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(expected, abs=1e-6)
    # The bias moves every logit: b = -1 leaves the positives at 0 and pushes negatives to -1.
    expected_b = (2 * math.log(2) + 2 * math.log(1 + math.exp(-1))) / 2
    assert siglip_loss(eye, eye, torch.tensor(0.0), torch.tensor(-1.0)).item() == pytest.approx(expected_b, abs=1e-6)


def test_losses_do_not_depend_on_batch_order():
    torch.manual_seed(0)
    images, texts, order = torch.randn(5, 8), torch.randn(5, 8), torch.randperm(5)
    scale, bias = torch.tensor(1.3), torch.tensor(-2.0)
    assert clip_loss(images[order], texts[order], scale).item() == pytest.approx(clip_loss(images, texts, scale).item())
    assert siglip_loss(images[order], texts[order], scale, bias).item() == \
        pytest.approx(siglip_loss(images, texts, scale, bias).item())


def test_spot_targets_point_at_the_patches_where_facts_are_drawn():
    _, truth = generate_panel(5, 3, 128)
    report, layout = make_report(truth), truth["camera"]["layout"]
    targets = torch.tensor([spot_targets(report, layout, 8, 16)])
    assert targets.shape == (1, len(SPOTS), 2)
    patches, classes = targets[0, :, 0], targets[0, :, 1]
    rows, cols = patches // 16, patches % 16
    # The tag is the panel's top strip: its six characters sit above the gauge, left to right.
    assert (rows[:6] < rows[10]).all() and cols[:6].tolist() == sorted(cols[:6].tolist())
    names = [name for name, _ in SPOTS]
    assert int(classes[names.index("gauge")]) == report["gauge_reading"]
    assert int(classes[names.index("warning")]) == int(report["warning_label"])
    lamp_classes = classes[[i for i, n in enumerate(names) if n == "lamp"]].tolist()
    assert lamp_classes[len(report["lamps"]):] == [IGNORE] * (4 - len(report["lamps"]))
    # The same facts at 16-px patches land in the coarser grid's cells.
    coarse = torch.tensor(spot_targets(report, layout, 16, 8))
    assert (coarse[:, 0] == (rows // 2) * 8 + cols // 2).all() and (coarse[:, 1] == classes).all()


def test_field_accuracy_counts_present_facts_only():
    reports = [generate_panel(5, i, 128)[1] for i in range(4)]
    targets = torch.tensor([spot_targets(make_report(t), t["camera"]["layout"], 8, 16) for t in reports])
    perfect = [torch.nn.functional.one_hot(targets[:, i, 1].clamp(min=0), n).float() for i, (_, n) in enumerate(SPOTS)]
    where = torch.nn.functional.one_hot(targets[:, :, 0], 256).transpose(1, 2).float()
    assert all(v == 1.0 for v in field_accuracy(perfect + [where], targets).values())
    off_by_one = [p.roll(1, dims=-1) for p in perfect] + [where.roll(3 * 16 + 3, dims=1)]  # 3 rows, 3 columns off
    result = field_accuracy(off_by_one, targets)
    assert result["gauge"] == 1.0 and result["code_exact"] == 0.0 and result["warning"] == 0.0
    assert result["where"] == 0.0
    assert field_accuracy(perfect + [where.roll(1, dims=1)], targets)["where"] > 0.9  # a neighbour counts


def test_where_loss_is_low_only_when_each_fact_points_at_its_own_patch():
    _, truth = generate_panel(5, 3, 128)
    targets = torch.tensor([spot_targets(make_report(truth), truth["camera"]["layout"], 8, 16)])
    pointing = torch.nn.functional.one_hot(targets[:, :, 0], 256).transpose(1, 2).float() * 30
    assert where_loss(pointing, targets) < 1e-3
    assert where_loss(pointing.roll(1, dims=1), targets) > 1  # every fact one patch off
    assert where_loss(torch.zeros(1, 256, len(SPOTS)), targets) == pytest.approx(1.0)  # uniform: chance


def test_mean_patch_token_averages_every_patch_of_every_image():
    torch.manual_seed(0)
    vision = build_clip(SPEC, 16, 1, 0).vision_model.eval()
    pixels = torch.randn(5, 3, SPEC.image_size, SPEC.image_size)
    with torch.no_grad():
        tokens = vision(pixel_values=pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(mean_patch_token(vision, pixels, batch_size=2), tokens.mean((0, 1)), atol=1e-5, rtol=1e-5)


def test_seeded_projector_pools_the_patch_the_where_head_names_minus_the_mean_token():
    torch.manual_seed(0)
    heads, projector = SpotHeads(64), QueryPoolProjector(64, 32, len(SPOTS))
    plain_mlp = copy.deepcopy(projector.mlp)
    tokens, mean = torch.randn(2, 256, 64), torch.randn(64)
    with torch.no_grad():
        seed_query_projector(projector, heads, mean)
        where = heads.where(heads.token_norm(tokens))  # [images, patches, facts]
        out = projector(tokens)
        # Token i: the patches weighted by the where head's softmax for fact i, centred, through the MLP.
        expected = plain_mlp(where.softmax(1).transpose(1, 2) @ tokens - mean)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one per fact"):
        seed_query_projector(QueryPoolProjector(64, 32, 5), heads, mean)


def test_perturbations_change_one_fact():
    _, truth = generate_panel(5, 4, 128)
    report = make_report(truth)
    for fact, wrong in perturbations(report, random.Random(0)).items():
        assert caption_of(wrong) != caption_of(report), fact
        changed = [k for k in report if report[k] != wrong[k]]
        assert len(changed) == 1, (fact, changed)


@pytest.mark.parametrize(("category", "gold", "predicted", "expected"), [
    ("gauge", "42", "46", {"gauge_within_5": True, "gauge_exact": False}),
    ("gauge", "42", "48", {"gauge_within_5": False, "gauge_exact": False}),
    ("gauge", "42", "no idea", {"gauge_within_5": False, "gauge_exact": False}),
    ("damage", "none", "none", {"damage_present": True}),
    ("damage", "crack", "dent", {"damage_present": True, "damage_type": False}),
    ("damage", "crack", "none", {"damage_present": False, "damage_type": False}),
    ("asset_code", "KX-4821", " KX-4821.", {"asset_code": True}),
    ("asset_code", "KX-4821", "KX-4827", {"asset_code": False}),
    ("action", "schedule repair", "Schedule repair", {"action": True}),
])
def test_judge(category, gold, predicted, expected):
    assert judge(category, gold, predicted) == expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_dataset(root / "data", 24, 11, 64 * 2)
    tokenizer = train_tokenizer(corpus_texts(root / "data"), root / "lm", 400)
    return root, tokenizer


def test_tokenizer_splits_digits_and_has_a_chat_template(corpus):
    _, tokenizer = corpus
    assert [t for t in tokenizer.tokenize("KX-4821") if t.isdigit()] == ["4", "8", "2", "1"]
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer("gauge at 73")["input_ids"]) == "gauge at 73"


def test_pack_cuts_rows_across_documents():
    rows = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_tiny_lm_pretrains_and_loads(corpus):
    root, tokenizer = corpus
    result = pretrain_lm(corpus_texts(root / "data", tokenizer), tokenizer, root / "lm", steps=12, batch_size=4,
                         seq_len=64, hidden_size=64, layers=1)
    losses = [h["loss"] for h in result["history"]]
    assert sum(losses[-3:]) / 3 < losses[0]  # it learns something of the corpus
    model = AutoModelForCausalLM.from_pretrained(root / "lm")
    assert model.config.model_type == "qwen2" and model.config.eos_token_id == tokenizer.eos_token_id


def test_tiny_tower_trains_saves_and_loads_as_a_vision_tower(corpus, tmp_path):
    root, tokenizer = corpus
    images, truths = zip(*[generate_panel(11, i, SPEC.image_size) for i in range(16)], strict=True)
    reports = [make_report(t) for t in truths]
    pixels = image_processor(SPEC)(list(images), return_tensors="pt")["pixel_values"]
    targets = torch.tensor([spot_targets(r, t["camera"]["layout"], SPEC.patch_size, SPEC.image_size // SPEC.patch_size)
                            for r, t in zip(reports, truths, strict=True)])
    captions = [caption_of(r) for r in reports]
    for loss in ("clip", "siglip"):
        model, history = train_tower(pixels, captions, targets, tokenizer, SPEC, loss=loss, steps=3, batch_size=8)
        assert len(history) == 3 and all(math.isfinite(h["contrastive"]) for h in history)
    scores = zero_shot(model.clip, tokenizer, pixels, list(reports))
    assert set(scores) == {"retrieval", "asset_code", "lamp", "gauge", "damage"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert set(evaluate_fields(model, pixels, targets)) >= {"code_exact", "gauge", "lamp"}
    save_tower(model, SPEC, tmp_path / "tower")
    tower = VisionTower(load_vision_encoder(str(tmp_path / "tower")), feature_layer=-1)
    processor = load_image_processor(str(tmp_path / "tower"))
    features = tower(processor(list(images[:2]), return_tensors="pt")["pixel_values"])
    assert features.shape == (2, (SPEC.image_size // SPEC.patch_size) ** 2, SPEC.width)


def test_save_fp16_halves_the_files_and_loads_as_fp32(tiny_model, tmp_path):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "fp32", processor)
    copy, _ = load_pretrained(tmp_path / "fp32")
    save_fp16(copy, processor, tmp_path / "fp16")
    loaded, loaded_processor = load_pretrained(tmp_path / "fp16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert folder_megabytes(tmp_path / "fp16") < 0.75 * folder_megabytes(tmp_path / "fp32")
    prompt = loaded_processor.apply_chat_template([{"role": "user", "content": "<image>\nhi"}])
    inputs = loaded_processor(images=[Image.new("RGB", (60, 50), (200, 30, 30))], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=2e-2)


def test_stage2_mixture_keeps_short_records(tmp_path):
    write_dataset(tmp_path, 6, 3, 128)
    kept = json.loads(stage2_records(tmp_path, 0.0, 0).read_text())
    assert sorted({r["id"].rsplit("_", 1)[1] for r in kept}) == ["all", "chat"] and len(kept) == 12
    # The two-question records are dropped: the all-question ones ask what they ask.
    assert len(json.loads(stage2_records(tmp_path, 1.0, 0).read_text())) == 24


def test_tower_starts_as_its_patch_embedding_and_heads_read_the_named_patches():
    model = build_clip(SPEC, 32, 5, 3)
    layer = model.vision_model.encoder.layers[0]
    assert layer.self_attn.out_proj.weight.abs().sum() == 0 and layer.mlp.fc2.weight.abs().sum() == 0
    tokens = torch.randn(3, (SPEC.image_size // SPEC.patch_size) ** 2, SPEC.width)
    targets = torch.zeros(3, len(SPOTS), 2, dtype=torch.long)
    targets[:, :, 0] = torch.randint(0, tokens.shape[1], (3, len(SPOTS)))
    heads = Contrastive(model, "clip").heads
    *logits, where = heads(tokens, targets)
    assert [x.shape for x in logits] == [(3, classes) for _, classes in SPOTS]
    assert where.shape == (3, tokens.shape[1], len(SPOTS))
    # Changing a token no fact points at changes no logit.
    unused = sorted(set(range(tokens.shape[1])) - set(targets[:, :, 0].flatten().tolist()))
    if unused:
        moved = tokens.clone()
        moved[:, unused] += 10
        assert all(torch.equal(a, b) for a, b in zip(heads(moved, targets)[:-1], logits, strict=True))


def test_quick_recipe_end_to_end(tmp_path, capsys):
    from vlm.demo.__main__ import main

    assert main(["build", "--quick", "--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"),
                 "--example", str(tmp_path / "panel.jpg"), "--threads", str(torch.get_num_threads())]) == 0
    record = json.loads((tmp_path / "work" / "recipe.json").read_text())
    assert {"data", "tokenizer", "tower_loss_choice", "tower", "stage1_align", "stage2_instruct",
            "merge_and_save", "eval_after_stage2"} <= set(record["steps"])
    metrics = record["metrics"]
    assert metrics["tower_loss_choice"]["chosen"] in ("clip", "siglip")
    for stage in ("before_stage1", "after_stage1", "after_stage2"):
        assert {"lamp", "asset_code", "action", "gauge_within_5", "damage_present"} <= set(metrics[stage])
    for png in ("loss_lm.png", "loss_tower.png", "align/loss.png", "instruct/loss.png"):
        assert (tmp_path / "work" / png).is_file(), png
    model, processor = load_pretrained(tmp_path / "model")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert Image.open(tmp_path / "panel.jpg").format == "JPEG"
    assert metrics["example"]["truth"] and isinstance(metrics["example"]["answer"], str)
