"""Every rule of shared/scoring.md on hand-checked cases; each expected value is worked out in the comment."""

import numpy as np
import pytest

from eval import scoring
from eval.benchmarks import score
from eval.scoring import (
    Gold,
    evalai_answer,
    gqa_correct,
    judge_panel,
    normalize_answer,
    pope_answer,
    process_punctuation,
    process_words,
    scienceqa_correct,
    scienceqa_letter,
    vqa_accuracy,
)
from eval.stats import bootstrap_interval, bootstrap_statistic


def _ten(match: str, m: int, other: str = "zzz") -> list[str]:
    return [match] * m + [other] * (10 - m)


# ---- step 6: per-annotator agreement -------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # the matching annotator sees 0 others -> 0; nine others see 1 -> 1/3; 9/3/10 = 0.3
        (2, 0.6),  # 2 x 1/3 + 8 x 2/3 = 18/3; / 10 = 0.6
        (3, 0.9),  # 3 x 2/3 + 7 x 1 = 9; / 10 = 0.9
        (4, 1.0),  # 4 x min(1, 3/3) + 6 x 1 = 10
        (10, 1.0),
    ],
)
def test_matches_among_ten_annotators(m, expected):
    assert vqa_accuracy("dog", _ten("dog", m)) == pytest.approx(expected)


def test_fewer_annotators_use_the_same_rule():
    # 3 answers, 2 match: each matching one sees 1 other (1/3), the third sees 2 (2/3): (1/3+1/3+2/3)/3 = 4/9.
    assert vqa_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx(4 / 9)


# ---- steps 1-2: whitespace and the all-annotators-agree exception --------------------------------


def test_agreeing_annotators_compare_raw_strings_case_sensitively():
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0  # no normalisation at all, so the period stays
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # step 1 still applies: newline -> space, strip


def test_agreement_is_judged_after_whitespace_cleanup():
    # "yes " and "yes\t" become "yes": all ten agree, so "Yes" is compared raw and fails.
    assert vqa_accuracy("Yes", ["yes"] * 8 + ["yes ", "yes\t"]) == 0.0


def test_disagreeing_annotators_normalise_both_sides():
    # Nine "yes", one "no": "Yes." -> "yes" matches 9; every annotator sees >= 8 matches -> 1.0.
    assert vqa_accuracy("Yes.", _ten("yes", 9, "no")) == 1.0
    assert vqa_accuracy("no", _ten("yes", 9, "no")) == pytest.approx(0.3)


# ---- step 3: punctuation -------------------------------------------------------------------------


def test_punctuation_becomes_space_unless_next_to_a_space():
    assert process_punctuation("t-shirt") == "t shirt"
    assert process_punctuation("t - shirt") == "t  shirt"  # " -" occurs: every "-" deleted
    assert process_punctuation("yes!") == "yes "
    assert process_punctuation("(red)") == " red "
    # The decision is per character: "-" touches a space somewhere, so both hyphens go; "," never does.
    assert process_punctuation("t-shirt -red,blue") == "tshirt red blue"


def test_digit_comma_digit_deletes_every_punctuation_mark():
    assert process_punctuation("1,000") == "1000"
    assert process_punctuation("t-shirt 1,2") == "tshirt 12"  # "-" deleted, not spaced, because of "1,2"
    assert process_punctuation("1, 000") == "1 000"  # comma next to a space: deleted, no digit-comma-digit
    assert normalize_answer("red,blue") == "red blue"
    assert vqa_accuracy("1,000", _ten("1000", 3, "lots")) == pytest.approx(0.9)
    assert vqa_accuracy("1, 000", _ten("1000", 3, "lots")) == 0.0  # "1 000" is not "1000"


def test_characters_that_are_never_touched():
    for text in ("don't", "2:30", "#1", "$5", "50%", "a&b", "c*d", "x^2", "~", "a|b"):
        assert process_punctuation(text) == text


# ---- step 4: periods -----------------------------------------------------------------------------


def test_periods_deleted_unless_followed_by_a_digit():
    assert process_punctuation("5.") == "5"
    assert process_punctuation("3.5") == "3.5"
    assert process_punctuation("5.a") == "5a"
    assert process_punctuation(".5") == ".5"
    assert process_punctuation("1.5.") == "1.5"


def test_only_the_first_32_periods_are_deleted():
    assert process_punctuation("a" + "." * 40) == "a" + "." * 8
    disagree = _ten("yes", 5, "no")
    assert vqa_accuracy("yes" + "." * 32, disagree) == 1.0  # all 32 go: "yes" matches 5
    assert vqa_accuracy("yes" + "." * 33, disagree) == 0.0  # one survives: "yes." matches nobody


# ---- step 5: words -------------------------------------------------------------------------------


def test_number_words_become_digits():
    assert process_words("Two dogs") == "2 dogs"
    assert process_words("none") == "0"
    assert process_words("zero ten eleven") == "0 10 eleven"
    # Annotators disagree (four "2", six "3"): "two" -> "2" matches four -> 1.0.
    assert vqa_accuracy("two", _ten("2", 4, "3")) == 1.0


def test_articles_are_dropped():
    assert process_words("a dog") == "dog"
    assert process_words("The Dog") == "dog"
    assert process_words("An apple and another") == "apple and another"
    assert process_words("a") == ""


def test_contractions_table():
    assert process_words("dont whats youre") == "don't what's you're"
    assert process_words("somebody'd") == "somebodyd"  # the table maps this one backwards
    assert process_words("Im") == "im"  # keys are matched after lowercasing; the table's "Im" never fires
    assert process_words("don't") == "don't"
    assert len(scoring.CONTRACTIONS) == 120
    assert vqa_accuracy("dont know", _ten("don't know", 3, "no")) == pytest.approx(0.9)


# ---- modes ---------------------------------------------------------------------------------------


def test_evalai_processor():
    assert evalai_answer("The poster shows a 10% discount.") == "poster shows 10% discount"
    assert evalai_answer("1,000?") == "1000"
    assert evalai_answer("cat's") == "cat 's"
    # Commas go first, so the comma rule never fires and "-" becomes a space.
    assert evalai_answer("t-shirt, 1,2") == "t shirt 12"
    assert normalize_answer("t-shirt, 1,2") == "tshirt 12"


def test_modes_differ_where_scoring_md_says():
    assert vqa_accuracy("Yes", ["yes"] * 10, "official") == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10, "llava") == 1.0  # EvalAI lowercases the prediction first
    # Ten "Yes": official and llava compare raw gold "Yes" with "yes"; m4c normalises both sides.
    assert vqa_accuracy("yes", ["Yes"] * 10, "official") == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 10, "llava") == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 10, "m4c") == 1.0
    # "'s" -> " 's" happens in EvalAI only: the llava prediction no longer matches raw-normalised gold.
    gold = _ten("cat's", 3, "dog")
    assert vqa_accuracy("cat's", gold, "official") == pytest.approx(0.9)
    assert vqa_accuracy("cat's", gold, "llava") == 0.0
    assert vqa_accuracy("cat's", gold, "m4c") == pytest.approx(0.9)
    with pytest.raises(ValueError, match="unknown VQA mode"):
        vqa_accuracy("x", ["x"], "lmms")


# ---- GQA -----------------------------------------------------------------------------------------


def test_gqa_modes():
    assert gqa_correct("Yes.", "yes", "llava")
    assert gqa_correct("Left..", "left", "llava")  # rstrip removes every trailing period
    assert not gqa_correct("yes ", "yes", "llava")  # no whitespace stripping
    assert not gqa_correct("Yes.", "yes", "official")
    assert gqa_correct("yes", "yes", "official")


# ---- POPE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes, there is a dog. No other animal.", "yes"),  # only the first sentence counts
        ("There is no dog", "no"),
        ("no,", "no"),  # commas are deleted before splitting
        ("not.", "no"),
        ("Not really", "yes"),  # only "No", "no" and "not" count
        ("NO", "yes"),
        ("Nope", "yes"),
        ("cannot", "yes"),
        ("no\nthere", "yes"),  # split on single spaces only: the token is "no\nthere"
        ("yes.no", "yes"),
    ],
)
def test_pope_first_sentence_rule(text, expected):
    assert pope_answer(text) == expected


def _pope_golds(split: str, labels: list[str]) -> list[Gold]:
    return [Gold(f"{split}/{i}", label, {"split": split}) for i, label in enumerate(labels)]


def test_pope_metrics_per_split_and_mean():
    golds = _pope_golds("random", ["yes", "yes", "no", "no"]) + _pope_golds("popular", ["yes", "no", "no"])
    predictions = {
        "random/0": "Yes",
        "random/1": "No",
        "random/2": "No",
        "random/3": "yes",
        "popular/0": "Yes.",
        "popular/1": "no",
        "popular/2": "No, not at all",
    }
    result = score("pope", golds, predictions)
    random, popular = result["per_category"]["split"]["random"], result["per_category"]["split"]["popular"]
    # random: TP 1, FN 1, TN 1, FP 1 -> every metric 0.5; yes-ratio 2/4.
    assert (random["tp"], random["fn"], random["tn"], random["fp"]) == (1, 1, 1, 1)
    assert [random[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == [50.0] * 5
    # popular: TP 1, TN 2 -> 1.0 everywhere; yes-ratio 1/3 printed "0.333" -> 33.3.
    assert [popular[k] for k in ("accuracy", "precision", "recall", "f1")] == [100.0] * 4
    assert popular["yes_ratio"] == 33.3
    # Mean over splits: F1 (0.5 + 1) / 2 = 0.75; yes-ratio (0.5 + 0.3333) / 2 = 0.41667 -> "0.417".
    assert result["metric"] == "f1" and result["value"] == 75.0
    assert result["mean_over_splits"]["yes_ratio"] == 41.7
    assert result["n"] == 7


def test_pope_pairs_by_id_not_position():
    golds = _pope_golds("random", ["yes", "no"])
    forward = score("pope", golds, {"random/0": "yes", "random/1": "no"})
    backward = score("pope", golds, dict(reversed(list({"random/0": "yes", "random/1": "no"}.items()))))
    assert forward["value"] == backward["value"] == 100.0


def test_pope_zero_denominators_give_zero():
    # All labels "no", all answers "no": TP = FP = FN = 0 -> precision, recall, F1 are 0/0 -> 0.
    result = score(
        "pope", _pope_golds("adversarial", ["no", "no"]), {"adversarial/0": "no", "adversarial/1": "No"}
    )
    split = result["per_category"]["split"]["adversarial"]
    assert (split["precision"], split["recall"], split["f1"], split["accuracy"], split["yes_ratio"]) == (
        0.0,
        0.0,
        0.0,
        100.0,
        0.0,
    )


def test_pope_missing_answer_counts_as_wrong():
    # Label yes, no answer: counted as "no" -> FN; accuracy 1 of 2.
    result = score("pope", _pope_golds("random", ["yes", "no"]), {"random/1": "no"})
    split = result["per_category"]["split"]["random"]
    assert (split["fn"], split["tn"], split["accuracy"]) == (1, 1, 50.0)
    assert result["missing"] == {"count": 1, "ids": ["random/0"]}


# ---- ScienceQA -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("B. dog", "B"),
        ("B.", None),  # too short for "letter + '. '"
        ("B.dog", None),
        ("b", None),  # no case folding
        (" B", None),  # no stripping
        ("AB", None),  # a whole option letter, not a substring of "ABCDE"
        ("F", None),  # not one of LLaVA's options A-E
        ("The answer is C.", "C"),
        ("The answer is C!", "C"),  # the last "." of the pattern is any character
        ("The answer is C", None),
        ("The answer is A. The answer is B.", None),  # must match exactly once
        ("I think the answer is B.", None),
    ],
)
def test_scienceqa_letter_parsing(text, letter):
    assert scienceqa_letter(text) == letter


def test_scienceqa_letter_beyond_choices_is_wrong():
    assert not scienceqa_correct("D", 3, 3)  # index 3 would match, but there are only A-C
    assert scienceqa_correct("D", 3, 4)
    assert not scienceqa_correct("The answer is F.", 5, 6)
    assert not scienceqa_correct("C", 1, 3)


def test_scienceqa_accuracy_rounding():
    golds = [Gold("1", (0, 2)), Gold("2", (1, 2)), Gold("3", (2, 3))]
    result = score("scienceqa", golds, {"1": "A", "2": "The answer is B.", "3": "A"})
    assert result["value"] == 66.67  # 2 / 3 * 100 = 66.666... printed "%.2f"


# ---- aggregation, missing and unknown ids --------------------------------------------------------


def test_vqa_overall_and_per_answer_type():
    golds = [
        Gold("1", ["yes"] * 10, {"answer_type": "yes/no"}),
        Gold("2", _ten("2", 4, "3"), {"answer_type": "number"}),
        Gold("3", _ten("red", 2, "blue"), {"answer_type": "other"}),
    ]
    predictions = {"1": "Yes", "2": "two", "3": "red"}
    llava, official = (
        score("vqav2", golds, predictions, "llava"),
        score("vqav2", golds, predictions, "official"),
    )
    assert llava["value"] == 86.67  # (1 + 1 + 0.6) / 3
    assert official["value"] == 53.33  # (0 + 1 + 0.6) / 3
    assert official["per_category"]["answer_type"]["yes/no"]["value"] == 0.0
    assert official["per_category"]["answer_type"]["other"]["value"] == 60.0
    assert score("vqav2", golds, predictions)["mode"] == "llava"  # LLaVA's numbers are the default


def test_missing_empty_and_unknown_predictions_are_counted():
    golds = [Gold("1", ["a"] * 10), Gold("2", ["b"] * 10), Gold("3", ["c"] * 10)]
    result = score("textvqa", golds, {"1": "a", "2": "  ", "9": "x"})
    assert result["mode"] == "m4c" and result["n"] == 3
    assert result["value"] == 33.33  # 1 of 3; the missing and the empty one score 0
    assert result["missing"] == {"count": 1, "ids": ["3"]}
    assert result["empty"] == {"count": 1, "ids": ["2"]}
    assert result["unknown_ids"] == {"count": 1, "ids": ["9"]}


def test_empty_prediction_scores_zero_even_against_empty_answers():
    assert score("vqav2", [Gold("1", [""] * 10)], {"1": ""}, "official")["value"] == 0.0


def test_mode_must_fit_the_benchmark():
    with pytest.raises(ValueError, match="does not apply to pope"):
        score("pope", _pope_golds("random", ["yes"]), {}, "m4c")


# ---- synthetic panels ----------------------------------------------------------------------------


def test_panels_metrics():
    golds = [
        Gold("code1", "SA-4040", {"category": "asset_code"}),
        Gold("code2", "KT-0001", {"category": "asset_code"}),
        Gold("g1", "42", {"category": "gauge"}),
        Gold("g2", "42", {"category": "gauge"}),
        Gold("d1", "none", {"category": "damage"}),
        Gold("d2", "dent", {"category": "damage"}),
        Gold("d3", "crack", {"category": "damage"}),
        Gold("l1", "on", {"category": "lamp"}),
    ]
    predictions = {
        "code1": " sa-4040. ",
        "code2": "KT-OOO1",
        "g1": "The gauge reads 47",
        "g2": "48",
        "d1": "None.",
        "d2": "crack",
        "d3": "banana",
        "l1": "On",
    }
    result = score("panels", golds, predictions)
    cats = result["per_category"]["category"]
    assert cats["asset_code"]["value"] == 50.0  # case, spaces and a trailing period are forgiven
    assert (
        cats["gauge"]["value"] == 0.0 and cats["damage"]["value"] == 33.33 and cats["lamp"]["value"] == 100.0
    )
    extra = result["extra"]
    assert extra["gauge_within_5"]["value"] == 50.0  # |47 - 42| = 5 counts, |48 - 42| = 6 does not
    # Presence: none/none right, crack for dent right (both present), "banana" names no damage: 2 of 3.
    assert extra["damage_presence_accuracy"]["value"] == 66.67
    assert extra["damage_type_accuracy"] == {
        "n": 2,
        "value": 0.0,
        "interval": [0.0, 0.0],
    }  # damaged cells only
    # CER: 0 for code1; "kt-ooo1" vs "kt-0001" is 3 substitutions over 7 -> 0.4286; mean 0.2143.
    assert extra["asset_code_cer"]["value"] == 0.2143
    assert result["value"] == 37.5  # 3 of 8 exact


def test_panels_missing_asset_code_counts_as_full_error():
    result = score("panels", [Gold("c", "AB-1234", {"category": "asset_code"})], {})
    assert result["extra"]["asset_code_cer"]["value"] == 1.0 and result["missing"]["count"] == 1


# ---- bootstrap -----------------------------------------------------------------------------------


def test_bootstrap_interval():
    scores = [1.0, 0.0] * 50
    low, high = bootstrap_interval(scores, seed=3)
    assert (low, high) == bootstrap_interval(scores, seed=3)  # deterministic for a seed
    assert low < 0.5 < high and 0.35 < low and high < 0.65
    assert bootstrap_interval([]) == (0.0, 0.0)
    assert bootstrap_interval([0.7] * 5) == pytest.approx((0.7, 0.7))


def test_bootstrap_statistic_resamples_each_group():
    groups = [np.zeros(10), np.ones(30)]
    # Each group keeps its own values, so the mean of group means is exactly 0.5 in every resample.
    assert bootstrap_statistic(groups, lambda gs: float(np.mean([g.mean() for g in gs]))) == pytest.approx(
        (0.5, 0.5)
    )
    assert bootstrap_statistic([np.array([])], lambda gs: 1.0) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("category", "gold", "predicted", "expected"),
    [
        # Spaces collapse and trailing periods go, so a sentence-cased action is still the action.
        ("action", "schedule repair", "Schedule  repair.", {"exact": 1.0}),
        # The first number, decimals kept: 47.5 is 5.5 from 42, outside +/-5 (an int parse would say 47).
        ("gauge", "42", "47.5", {"exact": 0.0, "gauge_within_5": 0.0}),
        ("gauge", "42", "about 37 psi", {"exact": 0.0, "gauge_within_5": 1.0}),
        ("gauge", "42", None, {"exact": 0.0, "gauge_within_5": 0.0}),
        # An answer that names no damage type says neither present nor absent: wrong either way.
        ("damage", "crack", "damaged", {"exact": 0.0, "damage_present": 0.0, "damage_type": 0.0}),
        ("damage", "crack", "Dent.", {"exact": 0.0, "damage_present": 1.0, "damage_type": 0.0}),
        ("damage", "none", "None", {"exact": 1.0, "damage_present": 1.0}),
        ("asset_code", "KX-4821", "kx-4821.", {"exact": 1.0, "asset_code_cer": 0.0}),
        ("asset_code", "KX-4821", "   ", {"exact": 0.0, "asset_code_cer": 1.0}),
        # A chat reply: the first code in it, any case, is the one judged.
        ("asset_code_chat", "KX-4821", "The asset tag reads kx-4821.", {"exact": 1.0}),
        ("asset_code_chat", "KX-4821", "KX-48210, I think", {"exact": 0.0}),
    ],
)
def test_judge_panel(category, gold, predicted, expected):
    assert judge_panel(category, gold, predicted) == expected
