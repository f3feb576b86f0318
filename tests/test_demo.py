"""The demo recipe's parts: both contrastive losses on hand-checked cases, the per-patch fact targets,
the scorer's rules, the corpus tokenizer, and a tiny tower and LM saved and loaded the way the VLM loads them."""

import dataclasses
import json
import math
import platform
import random

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from eval.benchmarks import score as benchmark_score
from eval.scoring import Gold
from tools.demo.contrastive import (
    GLYPHS,
    HEADS,
    IGNORE,
    LETTER_WEIGHT,
    POOL_SHARPNESS,
    SPOTS,
    Contrastive,
    SpotHeads,
    TowerSpec,
    build_clip,
    caption_of,
    clip_loss,
    evaluate_fields,
    field_accuracy,
    field_loss,
    glyph_loss,
    image_processor,
    perturbations,
    save_tower,
    seed_query_projector,
    siglip_loss,
    spot_targets,
    tokenize_captions,
    train_tower,
    where_loss,
    zero_shot,
)
from tools.demo.lm import (
    GATE_CATEGORIES,
    cell_question_records,
    compose_damage_embeddings,
    corpus_texts,
    instruction_records,
    instruction_tune,
    length_grouped_batches,
    lm_config,
    pack,
    panel_metas,
    panel_twins,
    pretrain_lm,
    question_records,
    report_codes,
    sentence_records,
    train_tokenizer,
    tune_until_it_answers,
)
from tools.demo.recipe import (
    AFTER_TOWER_PER_PRETRAINING_SECOND,
    LM_LAST_CHECK_SECONDS,
    LM_ROUNDS,
    LM_TUNING_PER_PRETRAINING_SECOND,
    QUICK,
    QUICK_SPEC,
    STAGE2_FIXED_SECONDS,
    STAGE2_PER_STAGE1_STEP,
    Budget,
    folder_megabytes,
    keep_freed_memory,
    lm_predicted_end,
    samples_drawn,
    save_fp16,
    stage2_records,
    stage2_steps,
    tower_seconds,
)
from tools.demo.score import CHAT_CODE_PROMPT, judge, score
from tools.demo.twin import (
    DAMAGE_STATES,
    DAMAGE_WORDS,
    FACT_TOKENS,
    TWIN_SPOTS,
    distil_projector,
    image_twin,
    rarity_weights,
    twin_accuracy,
    twin_token_ids,
    twin_vocabulary,
)
from vlm.loading import load_pretrained
from vlm.processor import load_image_processor
from vlm.projector import QueryPoolProjector
from vlm.synth import write_dataset
from vlm.synth.panels import LOCATIONS, generate_panel, make_report
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
    # The tag is the panel's top strip: its seven characters sit above the gauge, left to right.
    names = [name for name, _ in SPOTS]
    assert (rows[:7] < rows[names.index("gauge")]).all() and cols[:7].tolist() == sorted(cols[:7].tolist())
    assert "".join(GLYPHS[c] for c in classes[:7]) == report["asset_code"]
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
    quiet = -torch.ones(4, len(SPOTS) - 7, len(GLYPHS))  # no glyph read on the other facts' patches
    where = torch.nn.functional.one_hot(targets[:, :, 0], 256).transpose(1, 2).float()
    pooled = torch.stack(perfect[:7], 1)  # the projector's code tokens read right too
    result = field_accuracy(perfect + [quiet, pooled, where], targets)
    assert result.pop("code_false_glyph") == 0.0 and all(v == 1.0 for v in result.values())
    assert set(result) >= {"code_letter", "code_dash", "code_digit", "code_exact", "lamp", "where"}
    off_by_one = [p.roll(1, dims=-1) for p in perfect] + [-quiet, pooled.roll(1, dims=-1),
                                                          where.roll(3 * 16 + 3, dims=1)]  # 3 rows, 3 columns off
    result = field_accuracy(off_by_one, targets)
    assert result["gauge"] == 1.0 and result["code_exact"] == 0.0 and result["warning"] == 0.0
    damaged = sum(int((targets[:, i, 1] > 0).sum()) for i, (kind, _) in enumerate(SPOTS) if kind == "damage")
    assert damaged and result["damage_recall"] == pytest.approx(  # rolled by one: only the last type reads as intact
        sum(int((targets[:, i, 1] > 0).sum() - (targets[:, i, 1] == HEADS["damage"] - 1).sum())
            for i, (kind, _) in enumerate(SPOTS) if kind == "damage") / damaged)
    assert result["where"] == 0.0 and result["code_false_glyph"] == 1.0 and result["code_pooled"] == 0.0
    assert field_accuracy(perfect + [quiet, pooled, where.roll(1, dims=1)], targets)["where"] > 0.9  # a neighbour counts


def test_field_loss_weighs_a_missed_damaged_cell_above_a_false_alarm():
    """Nine cells in ten are intact: reading a damaged cell as intact must cost more than the reverse."""
    cell = next(i for i, (kind, _) in enumerate(SPOTS) if kind == "damage")
    targets = torch.zeros(2, len(SPOTS), 2, dtype=torch.long)
    targets[0, cell, 1] = 1  # panel 0: a crack in the first cell; panel 1: intact there

    def loss(misread_panel: int) -> float:
        logits = [torch.zeros(2, classes) for _, classes in SPOTS]
        for panel in (0, 1):  # each panel's cell read with margin 3 for one class
            read = int(targets[panel, cell, 1]) if panel != misread_panel else 1 - int(targets[panel, cell, 1])
            logits[cell][panel, read] = 3.0
        rest = [torch.zeros(2, len(SPOTS) - 7, len(GLYPHS)), torch.zeros(2, 7, len(GLYPHS)),
                torch.zeros(2, 4, len(SPOTS))]
        return float(field_loss(logits + rest, targets))

    assert loss(misread_panel=0) > loss(misread_panel=1)


def test_field_loss_weighs_a_misread_code_letter_by_letter_weight_against_a_digit():
    """Letters are the code's weak characters (two slots of 23 classes against four of 10): a misread
    letter costs LETTER_WEIGHT times what a misread digit does."""
    targets = torch.zeros(1, len(SPOTS), 2, dtype=torch.long)
    targets[0, :7, 1] = torch.tensor([GLYPHS.index(c) for c in "BR-0131"])

    def loss(misread_slot: int) -> float:
        logits = [torch.zeros(1, classes) for _, classes in SPOTS]
        pooled = torch.full((1, 7, len(GLYPHS)), -10.0)
        for slot in range(7):
            read = int(targets[0, slot, 1]) if slot != misread_slot else (int(targets[0, slot, 1]) + 1) % len(GLYPHS)
            logits[slot][0] = -10.0
            logits[slot][0, read] = 10.0
            pooled[0, slot, int(targets[0, slot, 1])] = 10.0
        rest = [torch.full((1, len(SPOTS) - 7, len(GLYPHS)), -10.0), pooled, torch.zeros(1, 4, len(SPOTS))]
        return float(field_loss(logits + rest, targets))

    letter, digit, none = loss(misread_slot=1), loss(misread_slot=4), loss(misread_slot=-1)
    assert (letter - none) / (digit - none) == pytest.approx(LETTER_WEIGHT, rel=1e-3) and LETTER_WEIGHT > 1


def test_glyph_loss_wants_the_shown_glyph_above_zero_and_the_rest_below():
    labels = torch.tensor([0, 5, len(GLYPHS) - 1])
    sure = torch.nn.functional.one_hot(labels, len(GLYPHS)).float() * 20 - 10  # +10 on the glyph, -10 elsewhere
    assert glyph_loss(sure, labels) < 1e-3
    # The same ranking shifted up: softmax cross-entropy cannot tell, the one-vs-rest part can.
    assert glyph_loss(sure + 12, labels) > 1
    assert glyph_loss(-sure.abs(), None) < 1e-3 and glyph_loss(sure.abs(), None) > 1
    assert glyph_loss(torch.zeros(3, len(GLYPHS)), labels).item() == pytest.approx(
        len(GLYPHS) * math.log(2) / (math.log(len(GLYPHS)) + 1) + 1, rel=1e-5)


def test_where_loss_is_low_only_when_each_fact_points_at_its_own_patch():
    _, truth = generate_panel(5, 3, 128)
    targets = torch.tensor([spot_targets(make_report(truth), truth["camera"]["layout"], 8, 16)])
    pointing = torch.nn.functional.one_hot(targets[:, :, 0], 256).transpose(1, 2).float() * 30
    assert where_loss(pointing, targets) < 1e-3
    assert where_loss(pointing.roll(1, dims=1), targets) > 1  # every fact one patch off
    assert where_loss(torch.zeros(1, 256, len(SPOTS)), targets) == pytest.approx(1.0)  # uniform: chance


def test_seeded_projector_pools_where_the_where_head_points():
    torch.manual_seed(0)
    heads, projector = SpotHeads(64), QueryPoolProjector(64, 48, len(TWIN_SPOTS))
    tokens = torch.randn(2, 256, 64)
    with torch.no_grad():
        seed_query_projector(projector, heads, TWIN_SPOTS)
        normed = heads.token_norm(tokens)
        pooled = (POOL_SHARPNESS * heads.where(normed)).softmax(1).transpose(1, 2) @ normed  # [images, facts, width]
        torch.testing.assert_close(projector(tokens), projector.mlp(pooled[:, TWIN_SPOTS]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one per twin token"):
        seed_query_projector(QueryPoolProjector(64, 48, 5), heads, TWIN_SPOTS)


def test_rarity_weights_lift_rare_values_per_column():
    labels = torch.tensor([[0, 5]] * 90 + [[1, 5]] * 9 + [[2, 5]])
    weights = rarity_weights(labels, cap=5.0)
    torch.testing.assert_close(weights[:, 1], torch.ones(100))  # one value: nothing to rebalance
    assert float(weights[0, 0]) < 1 < float(weights[90, 0])  # scaled to mean 1 before the cap
    assert float(weights[90, 0] / weights[0, 0]) == pytest.approx(10 ** 0.5, rel=1e-4)  # 1/sqrt(count)
    assert float(weights[99, 0]) == 5.0  # capped
    by_frequency = rarity_weights(labels, torch.tensor([1.0, 0.5]), cap=50.0)
    assert float(by_frequency[90, 0] / by_frequency[0, 0]) == pytest.approx(10.0, rel=1e-4)  # 1/count
    torch.testing.assert_close(by_frequency[:, 1], torch.ones(100))


def test_projector_distils_to_the_twin_tokens_embeddings(corpus):
    """Synthetic features that show each fact's class at its own patch, in a pattern per class shared by
    the facts of a kind (as a glyph looks the same in every slot): distillation must write each twin
    token's embedding at its visual token, the gauge's three digits from the one gauge patch."""
    _, tokenizer = corpus
    torch.manual_seed(0)
    panels, width, facts = 600, 32, len(SPOTS)
    counts = {kind: len(FACT_TOKENS[kind]) - (kind == "lamp") for kind in FACT_TOKENS} | {"gauge": 101,
                                                                                   "damage": DAMAGE_STATES}
    classes = torch.stack([torch.randint(0, counts[kind], (panels,)) for kind, _ in SPOTS], 1)
    targets = torch.stack([torch.arange(facts).expand(panels, -1), classes], -1)  # fact i drawn at patch i
    patterns = {kind: torch.randn(count, width) for kind, count in counts.items()}
    place_patterns = torch.randn(3, 10, width)  # the gauge shows its reading as hundreds + tens + units
    patterns["gauge"] = torch.stack([sum(place_patterns[k, int(d)] for k, d in enumerate(f"{v:03d}"))
                                     for v in range(101)])
    features = torch.randn(panels, 64, width + facts) * 0.1
    for i, (kind, _) in enumerate(SPOTS):
        features[:, i, :width] += patterns[kind][classes[:, i]]
        features[:, i, width + i] += 5  # and where each fact is: the where head's seed finds it
    projector = QueryPoolProjector(width + facts, 64, len(TWIN_SPOTS))
    with torch.no_grad():
        projector.scores.weight.zero_()
        projector.scores.bias.zero_()
        projector.scores.weight[:, width:] = 10 * torch.eye(facts)[TWIN_SPOTS]
    twins = twin_token_ids(tokenizer, targets)
    embeddings, vocabulary = torch.randn(len(tokenizer), 64), twin_vocabulary(tokenizer)
    before = twin_accuracy(projector, features[500:], twins[500:], embeddings, vocabulary)
    history = distil_projector(projector, features[:500], twins[:500], embeddings, vocabulary, steps=300, lr=1e-2)
    after = twin_accuracy(projector, features[500:], twins[500:], embeddings, vocabulary)
    assert history[-1]["loss"] < history[0]["loss"] / 3
    assert before["code_letter"] < 0.2 and before["warning"] < 0.6 and before["gauge_exact"] < 0.1, before
    assert min(after["code_letter"], after["code_digit"], after["warning"], after["damage"], after["damage_recall"]) > 0.9, after
    # The three gauge queries pool the same patch: only their query embeddings tell them apart.
    assert after["gauge_digit"] > 0.5 and after["gauge_within_5"] > before["gauge_within_5"] + 0.3, (before, after)
    assert set(after) == {"code_letter", "code_dash", "code_digit", "lamp", "gauge_digit", "warning", "damage",
                          "damage_recall", "code_exact", "gauge_exact", "gauge_within_5"}


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
    # eval's panels rules: decimals count, an answer naming no damage type is not "present", codes any case.
    ("gauge", "42", "47.5", {"gauge_within_5": False, "gauge_exact": False}),
    ("damage", "crack", "damaged", {"damage_present": False, "damage_type": False}),
    ("asset_code_chat", "KX-4821", "the tag reads kx-4821.", {"asset_code_chat": True}),
])
def test_judge(category, gold, predicted, expected):
    assert judge(category, gold, predicted) == expected


def test_the_demo_and_the_panels_benchmark_score_answers_alike():
    """The same answers give the same numbers in the demo's result and in eval.vqa's panels metrics."""
    cases = [("gauge", "42", "47.5"), ("gauge", "42", " 46 "), ("gauge", "60", "60."), ("damage", "none", "None."),
             ("damage", "crack", "damaged"), ("damage", "dent", "Dent"), ("damage", "scorch", "none"),
             ("asset_code", "KX-4821", "kx-4821."), ("asset_code", "KX-4821", "KX-4827"), ("lamp", "on", "ON"),
             ("lamp", "off", "on"), ("action", "schedule repair", "Schedule  repair.")]
    golds = [Gold(str(i), gold, {"category": category}) for i, (category, gold, _) in enumerate(cases)]
    panels = benchmark_score("panels", golds, {str(i): said for i, (_, _, said) in enumerate(cases)})
    demo: dict[str, list[bool]] = {}
    for category, gold, said in cases:
        for name, right in judge(category, gold, said).items():
            demo.setdefault(name, []).append(right)
    per_category, extra = panels["per_category"]["category"], panels["extra"]
    eval_names = {"gauge_exact": per_category["gauge"], "asset_code": per_category["asset_code"],
                  "lamp": per_category["lamp"], "action": per_category["action"],
                  "gauge_within_5": extra["gauge_within_5"], "damage_present": extra["damage_presence_accuracy"],
                  "damage_type": extra["damage_type_accuracy"]}
    assert set(demo) == set(eval_names)
    for name, entry in eval_names.items():
        assert (len(demo[name]), round(100 * sum(demo[name]) / len(demo[name]), 2)) == (entry["n"], entry["value"])
    assert demo["gauge_within_5"] == [False, True, True] and demo["damage_present"] == [True, False, True, False]


def test_scoring_a_vlm_answers_through_the_panels_benchmarks_loop(tiny_model, tmp_path, monkeypatch):
    """Batched and grouped by image through generate_shared, each panel's chat question after its own."""
    model, processor = tiny_model
    write_dataset(tmp_path / "data", 2, 3, 56)
    calls, real = [], model.generate_shared

    def counted(**inputs):
        calls.append(inputs["input_ids"].shape[0])
        return real(**inputs)

    monkeypatch.setattr(model, "generate_shared", counted)
    result = score(model, processor, tmp_path / "data", answers_file=tmp_path / "answers.jsonl")
    assert calls == [16]  # 2 panels x (7 questions + the chat question), one batch
    asked = [json.loads(line) for line in (tmp_path / "data" / "questions.jsonl").read_text().splitlines()]
    damaged = sum(q["category"] == "damage" and q["answer"] != "none" for q in asked)
    expected = {f"n_{name}": 2 for name in ("action", "asset_code", "asset_code_chat", "damage_present", "gauge_exact",
                                            "gauge_within_5", "lamp", "severity", "warning")}
    assert {k: v for k, v in result.items() if k.startswith("n_")} == expected | (
        {"n_damage_type": damaged} if damaged else {})
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["category"] for a in answers[7::8]] == ["asset_code_chat"] * 2
    assert all(isinstance(a["predicted"], str) for a in answers)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_dataset(root / "data", 24, 11, 64 * 2)
    tokenizer = train_tokenizer(corpus_texts(root / "data"), root / "lm", 400)
    return root, tokenizer


def test_tokenizer_splits_digits_and_capitals_and_has_a_chat_template(corpus):
    _, tokenizer = corpus
    # Each character of a code is one token, the same token wherever the code stands.
    assert tokenizer.tokenize("KX-4821") == list("KX-4821")
    assert tokenizer.tokenize(" reads KX-4821.")[-8:] == [*"KX-4821", "."]
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer("gauge at 73, PWR lit")["input_ids"]) == "gauge at 73, PWR lit"


def test_corpus_puts_the_twin_where_the_image_goes(corpus):
    root, tokenizer = corpus
    metas = [json.loads(line) for line in (root / "data" / "meta.jsonl").read_text().splitlines()]
    texts = corpus_texts(root / "data", tokenizer)
    assert "<image>" not in "".join(texts)
    first_caption = texts[0]  # captions come first, in panel order; the prompt ends where the image was
    twin = image_twin(metas[0]["report"])
    assert first_caption.split("<|im_end|>")[0].endswith("\n" + twin)
    assert twin.startswith(metas[0]["report"]["asset_code"] + "<")
    # One token per fact, in SPOTS order, the gauge's reading in three digits: exactly the ids the
    # projector is distilled to.
    report = metas[0]["report"]
    assert f"{report['gauge_reading']:03d}<" in twin
    # Each cell's damage token names the cell, so the LM finds the asked cell by name, not by counting.
    damaged = {item["location"]: item["type"] for item in report["damage"]}
    assert all(f"<{cell} {damaged.get(cell, 'intact')}>" in twin for cell in LOCATIONS)
    targets = torch.tensor([spot_targets(report, metas[0]["camera"]["layout"], 8, 16)])
    ids = tokenizer(twin, add_special_tokens=False)["input_ids"]
    assert ids == twin_token_ids(tokenizer, targets)[0].tolist() and len(ids) == len(TWIN_SPOTS) == len(SPOTS) + 2


class _Copier:
    """Answers every prompt with the code that starts its user turn: a perfect copier, to check the scoring.
    ``report``: the code inside a JSON report's ``asset_code``; ``sentence``: inside a sentence."""

    def __init__(self, tokenizer, wrong: bool = False, report: bool = False, sentence: bool = False) -> None:
        self.tokenizer, self.wrong, self.report, self.sentence = tokenizer, wrong, report, sentence

    def eval(self) -> "_Copier":
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            answer = prompt.split("user\n")[1].split("<")[0]
            answer = answer[::-1] if self.wrong else answer
            answer = json.dumps({"asset_code": answer, "gauge_reading": 1}) if self.report else answer
            answer = f"The asset tag reads {answer}." if self.sentence else answer
            rows.append(ids.tolist() + self.tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        return torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])


def test_instruction_rounds_stop_at_the_gate(corpus, tmp_path):
    """No round when the LM already passes its gate; rounds up to the cap while it does not."""
    root, tokenizer = corpus
    pretrain_lm(corpus_texts(root / "data", tokenizer), tokenizer, tmp_path / "lm", steps=2, batch_size=2,
                seq_len=64, hidden_size=64, layers=1)
    records = question_records(root / "data")
    passed = tune_until_it_answers(root / "data", records, tokenizer, tmp_path / "lm", root / "data", 2, 2,
                                   max_rounds=3, threshold=0.0)
    assert len(passed) == 1 and set(passed[0]["answers"]) == {*GATE_CATEGORIES, "report_asset_code"}
    assert passed[0]["worst"] == min(passed[0]["answers"].values())
    checked = []  # the recipe's clock hears of each check as it ends
    failing = tune_until_it_answers(root / "data", records, tokenizer, tmp_path / "lm", root / "data", 2, 2,
                                    max_rounds=2, threshold=1.01, on_check=checked.append)
    assert [r["steps"] for r in failing] == [0, 2, 2] and [r.get("round") for r in failing] == [None, 1, 2]
    assert checked == failing


def test_scoring_from_true_twins_puts_each_panels_twin_where_the_image_goes(corpus):
    root, tokenizer = corpus
    twins = panel_twins(root / "data")
    result = score(_Copier(tokenizer), tokenizer, root / "data", twins=twins)  # it answers every question with the code
    assert result["asset_code"] == 1.0 and result["n_asset_code"] == 24
    assert result["lamp"] == 0.0 and result["n_lamp"] == 24
    assert result["asset_code_chat"] == 1.0 and result["n_asset_code_chat"] == 24  # asked once per panel
    assert score(_Copier(tokenizer, wrong=True), tokenizer, root / "data", twins=twins)["asset_code"] == 0.0


def test_report_codes_counts_reports_that_carry_the_panels_code(corpus):
    root, tokenizer = corpus
    assert report_codes(_Copier(tokenizer, report=True), tokenizer, root / "data") == 1.0
    assert report_codes(_Copier(tokenizer, wrong=True, report=True), tokenizer, root / "data") == 0.0
    assert report_codes(_Copier(tokenizer), tokenizer, root / "data") == 0.0  # a bare code is not a report


def test_the_code_asked_as_a_user_asks_is_right_when_the_reply_holds_it(corpus, tmp_path):
    root, tokenizer = corpus
    twins = panel_twins(root / "data")
    in_sentences = score(_Copier(tokenizer, sentence=True), tokenizer, root / "data", twins=twins,
                         answers_file=tmp_path / "answers.jsonl")
    assert in_sentences["asset_code_chat"] == 1.0 and in_sentences["asset_code"] == 0.0  # not a short answer
    first_panel = json.loads((root / "data" / "meta.jsonl").read_text().splitlines()[0])
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    asked = [a for a in answers if a["image"] == first_panel["image"]]
    assert [a["category"] for a in asked][-1] == "asset_code_chat" and len(asked) == 8  # after the panel's own 7
    assert asked[-1]["text"] == CHAT_CODE_PROMPT and asked[-1]["answer"] == first_panel["report"]["asset_code"]
    limited = score(_Copier(tokenizer, sentence=True), tokenizer, root / "data", limit=10, twins=twins)
    assert limited["n_asset_code_chat"] == 2  # the panels of the first 10 questions
    assert judge("asset_code_chat", "KX-4821", "The asset tag reads KX-4821.") == {"asset_code_chat": True}
    assert not judge("asset_code_chat", "KX-4821", "The asset tag reads KX-4827.")["asset_code_chat"]
    assert not judge("asset_code_chat", "KX-4821", "KX-48210")["asset_code_chat"]  # a longer number is not it


def test_instruction_records_add_a_share_of_reports_and_descriptions(corpus):
    root, _ = corpus
    shorts = question_records(root / "data") + cell_question_records(root / "data") + sentence_records(root / "data")
    records = instruction_records(root / "data", long_share=0.1)
    longs = records[len(shorts):]
    assert records[:len(shorts)] == shorts
    assert len(longs) == round(0.1 * len(question_records(root / "data"))) < 2 * 24
    assert all(r["id"].endswith(("_report", "_detail")) for r in longs) and len({r["id"] for r in longs}) == len(longs)
    assert {r["id"][-7:] for r in longs} == {"_report", "_detail"}
    everything = instruction_records(root / "data", long_share=10.0)  # more than there are: all of them
    assert len(everything) - len(shorts) == 2 * 24


def test_sentence_records_ask_the_copied_facts_as_a_user_does_and_answer_in_a_sentence(corpus):
    root, _ = corpus
    metas = panel_metas(root / "data")
    records = sentence_records(root / "data", seed=1)
    assert records == sentence_records(root / "data", seed=1) and len(records) == 2 * len(metas)
    for meta in metas:
        report = meta["report"]
        code, gauge = (next(r["conversations"] for r in records if r["id"] == f"{meta['id']}_{c}_sentence")
                       for c in ("asset_code", "gauge"))
        assert code[0]["value"].startswith("<image>\n") and "Answer" not in code[0]["value"]
        assert code[1]["value"] == f"The asset tag reads {report['asset_code']}."
        assert f"reads {report['gauge_reading']} " in gauge[1]["value"]
    assert len({r["conversations"][0]["value"] for r in records if r["id"].endswith("code_sentence")}) > 1


def test_cell_questions_ask_every_damaged_cell_and_as_many_intact_ones(corpus):
    root, _ = corpus
    metas = panel_metas(root / "data")
    records = cell_question_records(root / "data", seed=3)
    assert records == cell_question_records(root / "data", seed=3)
    for meta in metas:
        damaged = {item["location"]: item["type"] for item in meta["report"]["damage"]}
        asked = {r["id"].split("_damage_")[1]: r["conversations"] for r in records if r["image"] == meta["image"]}
        assert set(damaged) <= set(asked) and len(asked) == (2 * len(damaged) or 1)
        for cell, (question, answer) in asked.items():
            assert f"at the {cell} of the panel?" in question["value"] and question["value"].startswith("<image>\n")
            assert answer["value"] == damaged.get(cell, "none")
    assert any(m["report"]["damage"] for m in metas) and any(not m["report"]["damage"] for m in metas)


def test_length_grouped_batches_are_all_short_or_all_long_in_proportion():
    def record(i: int, chars: int) -> dict:
        return {"id": str(i), "conversations": [{"from": "gpt", "value": "x" * chars}]}

    records = [record(i, 500) for i in range(20)] + [record(i, 10) for i in range(20, 100)]
    batches = length_grouped_batches(records, 4, random.Random(0))
    drawn = [next(batches) for _ in range(400)]
    assert all(len(batch) == 4 and len({int(r["id"]) < 20 for r in batch}) == 1 for batch in drawn)
    assert 0.15 < sum(int(batch[0]["id"]) < 20 for batch in drawn) / len(drawn) < 0.25  # a fifth are long
    assert all(len(set(map(id, batch))) == 4 for batch in drawn)  # drawn without replacement
    few = length_grouped_batches(records[:3], 4, random.Random(0))
    assert len(next(few)) == 3  # fewer records than a batch: one short batch, not a hang


def test_pack_cuts_rows_across_documents():
    rows = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_question_records_ask_every_question_and_the_code_and_gauge_twice(corpus):
    root, _ = corpus
    questions = [json.loads(line) for line in (root / "data" / "questions.jsonl").read_text().splitlines()]
    records = question_records(root / "data")
    twice = [q for q in questions if q["category"] in ("asset_code", "gauge")]
    assert {q["category"] for q in twice} == {"asset_code", "gauge"} and len(records) == len(questions) + len(twice)
    first = next(r for r in records if r["id"] == twice[0]["question_id"])
    assert first["conversations"] == [{"from": "human", "value": "<image>\n" + twice[0]["text"]},
                                      {"from": "gpt", "value": twice[0]["answer"]}]
    assert all(sum(r["id"] == q["question_id"] for r in records) == 2 for q in twice)
    lamp = next(q for q in questions if q["category"] == "lamp")
    assert sum(r["id"] == lamp["question_id"] for r in records) == 1


def test_instruction_tuning_lowers_the_reply_loss_and_saves(corpus, tmp_path):
    root, tokenizer = corpus
    pretrain_lm(corpus_texts(root / "data", tokenizer), tokenizer, tmp_path / "lm", steps=2, batch_size=2,
                seq_len=64, hidden_size=64, layers=1)
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").state_dict()
    records = json.loads((root / "data" / "instruct.json").read_text())
    result = instruction_tune(root / "data", records, tokenizer, tmp_path / "lm", steps=12,
                              batch_size=4, lr=3e-3)
    losses = [h["loss"] for h in result["history"]]
    assert result["records"] == 24 * 5 and sum(losses[-3:]) < sum(losses[:3])
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_damage_tokens_start_as_the_sum_of_their_words(corpus):
    _, tokenizer = corpus
    model = AutoModelForCausalLM.from_config(lm_config(tokenizer, hidden_size=32, layers=1))
    before = model.get_input_embeddings().weight.detach().clone()
    compose_damage_embeddings(model, tokenizer)
    after = model.get_input_embeddings().weight.detach()

    def words(text: str) -> torch.Tensor:
        return before[tokenizer(text, add_special_tokens=False)["input_ids"]].mean(0)

    damage_ids = tokenizer.convert_tokens_to_ids(FACT_TOKENS["damage"])
    for (location, state), token_id in zip(DAMAGE_WORDS, damage_ids, strict=True):
        assert torch.allclose(after[token_id], words(" " + location) + words(" " + state))
    others = sorted(set(range(len(after))) - set(damage_ids))
    assert torch.equal(after[others], before[others])  # the lamps' tokens and every word are left as drawn


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


def test_contrastive_weight_scales_only_the_caption_term(corpus):
    _, tokenizer = corpus
    tokenizer.padding_side = "right"
    images, truths = zip(*[generate_panel(13, i, QUICK_SPEC.image_size) for i in range(4)], strict=True)
    reports = [make_report(t) for t in truths]
    pixels = image_processor(QUICK_SPEC)(list(images), return_tensors="pt")["pixel_values"]
    grid = QUICK_SPEC.image_size // QUICK_SPEC.patch_size
    targets = torch.tensor([spot_targets(r, t["camera"]["layout"], QUICK_SPEC.patch_size, grid)
                            for r, t in zip(reports, truths, strict=True)])
    text = tokenize_captions(tokenizer, [caption_of(r) for r in reports])
    torch.manual_seed(0)
    model = Contrastive(build_clip(QUICK_SPEC, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id), "siglip")
    totals = {}
    for weight in (1.0, 0.25):
        model.contrastive_weight = weight
        totals[weight], parts = model(pixels, text["input_ids"], text["attention_mask"], targets)
        assert totals[weight].item() == pytest.approx(weight * parts["contrastive"] + parts["fields"], rel=1e-5)
    assert totals[1.0].item() - totals[0.25].item() == pytest.approx(0.75 * parts["contrastive"], rel=1e-4)


def test_tower_stops_when_a_limit_asked_every_step_runs_out():
    images, truths = zip(*[generate_panel(12, i, QUICK_SPEC.image_size) for i in range(4)], strict=True)
    pixels = image_processor(QUICK_SPEC)(list(images), return_tensors="pt")["pixel_values"]
    grid = QUICK_SPEC.image_size // QUICK_SPEC.patch_size
    targets = torch.tensor([spot_targets(make_report(t), t["camera"]["layout"], QUICK_SPEC.patch_size, grid)
                            for t in truths])
    steps_begun = []  # the limit is unknown for two steps, then already spent
    _, history = train_tower(pixels, [""] * 4, targets, None, QUICK_SPEC, loss="none", steps=10, batch_size=2,
                             max_seconds=lambda: 0.0 if len(steps_begun) >= 3 else None,
                             before_step=lambda: steps_begun.append(1))
    assert len(history) == 3
    _, history = train_tower(pixels, [""] * 4, targets, None, QUICK_SPEC, loss="none", steps=3, batch_size=2,
                             max_seconds=lambda: None)
    assert len(history) == 3


def test_tower_seconds_keep_the_build_in_its_minutes_on_a_slow_day():
    budget = Budget()
    # Until the LM's pretraining has timed the machine, only the tower's own cap holds.
    assert tower_seconds(budget, 150.0, None) == 60 * budget.tower_minutes
    # A fast day: the cap is the tighter limit.
    assert tower_seconds(budget, 150.0, 400.0) == 60 * budget.tower_minutes
    # A slow day: what is left after the tower's start and the rest of the build's predicted time.
    slow = tower_seconds(budget, 200.0, 726.0)
    assert slow == pytest.approx(60 * budget.build_minutes - 200.0 - AFTER_TOWER_PER_PRETRAINING_SECOND * 726.0)
    assert slow < 60 * budget.tower_minutes
    assert tower_seconds(QUICK, 1.0, 2.0) is None  # the smoke test has no clock
    # The LM on time: its (predicted) end comes before the clock's limit, which holds.
    assert tower_seconds(budget, 200.0, 726.0, lm_ends_at=2000.0) == pytest.approx(slow)
    # The LM late: the tower trains on until the LM's end, still under its cap.
    late = tower_seconds(budget, 160.0, 864.0, lm_ends_at=2500.0)
    assert late == pytest.approx(2500.0 - 160.0)
    assert tower_seconds(budget, 160.0, 864.0) < late <= 60 * budget.tower_minutes


def test_lm_end_is_predicted_from_its_pretraining_then_from_its_last_round():
    # Before two rounds have run: a multiple of its pretraining's time after its start.
    from_pretraining = 90.0 + (1 + LM_TUNING_PER_PRETRAINING_SECOND) * 800.0
    assert lm_predicted_end(90.0, 800.0, []) == pytest.approx(from_pretraining)
    assert lm_predicted_end(90.0, 800.0, [900.0, 1500.0]) == pytest.approx(from_pretraining)
    # Rounds of 250 s on a slow day: each round left takes as long as the last one did.
    checks = [900.0, 1500.0, 1750.0]
    assert lm_predicted_end(90.0, 800.0, checks) == pytest.approx(1750.0 + (LM_ROUNDS - 2) * 250.0
                                                                   + LM_LAST_CHECK_SECONDS)
    assert lm_predicted_end(90.0, 800.0, checks) > from_pretraining
    # Every expected round done and the job still running: only its last check is left.
    done = [900.0 + 250.0 * i for i in range(LM_ROUNDS + 1)]
    assert lm_predicted_end(90.0, 800.0, done) == pytest.approx(done[-1] + LM_LAST_CHECK_SECONDS)


def test_stage2_fits_its_steps_to_the_time_left_at_stage_1s_pace():
    budget = Budget()
    stage1 = [{"step": s, "seconds": 0.2 * s} for s in range(1, 301)]  # 0.2 s per stage-1 step
    assert stage2_steps(budget, None, stage1) == budget.instruct_steps  # no clock: the budget's steps
    assert stage2_steps(budget, 3600.0, stage1) == budget.instruct_steps  # time enough
    per_step = STAGE2_PER_STAGE1_STEP * 0.2
    assert stage2_steps(budget, STAGE2_FIXED_SECONDS + 300 * per_step + 0.1, stage1) == 300
    assert stage2_steps(budget, 10.0, stage1) == 1  # out of time: one step, still a model


def test_tower_spec_sets_the_saved_towers_heads_and_activation(tmp_path):
    spec = dataclasses.replace(SPEC, head_width=32, activation="gelu")
    tower = Contrastive(build_clip(spec, 32, 5, 3), "siglip")
    save_tower(tower, spec, tmp_path / "tower")
    config = load_vision_encoder(str(tmp_path / "tower")).config
    assert (config.num_attention_heads, config.hidden_act) == (SPEC.width // 32, "gelu")
    settings = json.loads((tmp_path / "tower" / "zeroshot.json").read_text())  # the sigmoid's bias, for vlm.zeroshot
    assert settings == {"activation": "sigmoid", "logit_bias": tower.logit_bias.item()}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere it does nothing")
def test_keep_freed_memory_takes_effect_on_glibc():
    assert keep_freed_memory()


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


def test_stages_get_files_of_what_they_draw(tmp_path):
    write_dataset(tmp_path, 6, 3, 128)
    everything = json.loads(stage2_records(tmp_path, 1.0, 0).read_text())
    drawn = json.loads(stage2_records(tmp_path, 1.0, 0, count=10).read_text())
    assert len(drawn) == 10 and len({r["id"] for r in drawn}) == 10
    assert {r["id"] for r in drawn} < {r["id"] for r in everything}
    assert len(json.loads(stage2_records(tmp_path, 1.0, 0, count=100).read_text())) == 24  # fewer: all of them


def test_tower_starts_as_its_patch_embedding_and_heads_read_the_named_patches():
    model = build_clip(SPEC, 32, 5, 3)
    layer = model.vision_model.encoder.layers[0]
    assert layer.self_attn.out_proj.weight.abs().sum() == 0 and layer.mlp.fc2.weight.abs().sum() == 0
    tokens = torch.randn(3, (SPEC.image_size // SPEC.patch_size) ** 2, SPEC.width)
    targets = torch.zeros(3, len(SPOTS), 2, dtype=torch.long)
    targets[:, :, 0] = torch.randint(0, tokens.shape[1], (3, len(SPOTS)))
    heads = Contrastive(model, "clip").heads
    *logits, elsewhere, pooled, where = heads(tokens, targets)
    assert [x.shape for x in logits] == [(3, classes) for _, classes in SPOTS]
    assert elsewhere.shape == (3, len(SPOTS) - 7, len(GLYPHS)) and pooled.shape == (3, 7, len(GLYPHS))
    assert where.shape == (3, tokens.shape[1], len(SPOTS))
    # Changing a token no fact points at changes no logit.
    unused = sorted(set(range(tokens.shape[1])) - set(targets[:, :, 0].flatten().tolist()))
    if unused:
        moved = tokens.clone()
        moved[:, unused] += 10
        assert all(torch.equal(a, b) for a, b in zip(heads(moved, targets)[:-2], logits + [elsewhere], strict=True))


def test_quick_recipe_end_to_end(tmp_path, capsys):
    from tools.demo.__main__ import main

    assert main(["build", "--quick", "--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"),
                 "--example", str(tmp_path / "panel.jpg"), "--threads", str(torch.get_num_threads())]) == 0
    record = json.loads((tmp_path / "work" / "recipe.json").read_text())
    assert {"data", "tokenizer", "tower", "distil_projector", "stage1_align", "stage2_instruct",
            "merge_and_save", "eval_after_stage2"} <= set(record["steps"])
    metrics = record["metrics"]
    assert metrics["tower"]["loss"] == "siglip" and set(metrics["tower"]["zero_shot"]) >= {"retrieval", "asset_code"}
    assert metrics["tower"]["seconds_allowed"] is None  # the smoke test runs on steps, not on the clock
    assert set(metrics["distil_projector"]["held_out"]) >= {"code_letter", "damage"}
    assert {"lamp", "asset_code"} <= set(metrics["language_model"]["held_out_from_true_twins"])
    # Distillation filled the trainer's feature cache for every panel; stage 1 read it (same fingerprint
    # folder) instead of running the tower again.
    caches = [f for f in (tmp_path / "work" / "feature_cache").iterdir() if (f / "index.json").is_file()]
    assert len(caches) == 1
    assert len(json.loads((caches[0] / "index.json").read_text())) == QUICK.n_train + QUICK.n_eval
    # Stage 2's file holds just the samples it draws (fewer than the mixture), stage 1's every caption (fewer).
    train_dir = tmp_path / "work" / "data" / "train"
    assert len(json.loads((train_dir / "stage2.json").read_text())) == samples_drawn("demo-instruct.yaml",
                                                                                      QUICK.instruct_steps)
    assert len(json.loads((train_dir / "stage1.json").read_text())) == QUICK.n_train
    for stage in ("before_stage1", "after_stage1", "after_stage2"):
        assert {"lamp", "asset_code", "action", "gauge_within_5", "damage_present"} <= set(metrics[stage])
    for png in ("loss_lm.png", "loss_tower.png", "align/loss.png", "instruct/loss.png"):
        assert (tmp_path / "work" / png).is_file(), png
    model, processor = load_pretrained(tmp_path / "model")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert Image.open(tmp_path / "panel.jpg").format == "JPEG"
    assert metrics["example"]["truth"] and isinstance(metrics["example"]["answer"], str)
    assert metrics["stage2"]["steps"] == QUICK.instruct_steps  # no clock in the smoke test
    rounds = metrics["language_model"]["instruction_rounds"]
    assert rounds[0]["steps"] == 0 and [r["round"] for r in rounds[1:]] == [1, 2]  # the tiny LM never passes its gate
    # The LM's process wrote the wall time of each gate check as it ended, in order, for the tower's clock.
    checks = json.loads((tmp_path / "work" / "lm_checks.json").read_text())
    assert len(checks) == len(rounds) and checks == sorted(checks)
    assert 0 < checks[-1] - checks[0] < record["total_seconds"]
    # The last part again from the work folder: no round is left to give, the stages rerun and save.
    assert main(["stages", "--out", str(tmp_path / "again"), "--work", str(tmp_path / "work"),
                 "--threads", str(torch.get_num_threads())]) == 0
    record = json.loads((tmp_path / "work" / "recipe.json").read_text())
    assert len(record["reruns"]) == 1 and len(record["metrics"]["language_model"]["instruction_rounds"]) == 3
    assert {"lamp", "asset_code"} <= set(record["metrics"]["after_stage2"])
    assert load_pretrained(tmp_path / "again")[0].config.tokens_per_image == len(TWIN_SPOTS)
    assert main(["stages", "--work", str(tmp_path / "nothing")]) == 2


def test_compare_losses_trains_the_tower_with_each_loss_on_the_same_panels(tmp_path):
    from tools.demo.probe import compare_losses

    results = compare_losses(tmp_path, QUICK_SPEC, steps=2, n_train=16, n_eval=4, eval_every=1, batch_size=8)
    assert set(results) == {"clip", "siglip"}
    for result in results.values():
        assert [row["step"] for row in result["held_out_curve"]] == [1, 2]
        assert {"code_letter", "code_digit", "code_pooled_exact"} <= set(result["held_out_curve"][-1])
        assert set(result["zero_shot"]) == {"retrieval", "asset_code", "lamp", "gauge", "damage"}
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    # A run shorter than eval_every is still measured at its end.
    short = compare_losses(tmp_path, QUICK_SPEC, steps=1, n_train=16, n_eval=4, batch_size=8)
    assert [row["step"] for row in short["siglip"]["held_out_curve"]] == [1]
