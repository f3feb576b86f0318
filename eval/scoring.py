"""Scoring rules of the VQA-style benchmarks, exactly as the official tools apply them (shared/scoring.md).

Per-question functions (``vqa_accuracy``, ``gqa_correct``, ``pope_answer``, ``scienceqa_letter``,
``judge_panel``, ...) hold the rules; one scorer per kind of benchmark (``score_vqa``, ``score_pope``, ...)
turns a benchmark's gold items and predictions into its numbers. ``eval.benchmarks`` says which scorer a
benchmark uses and adds the missing and unknown ids. Percentages are rounded the way each official tool
prints them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from eval.stats import bootstrap_interval, bootstrap_statistic
from vlm.inspection import ASSET_CODE, DAMAGE_TYPES

# ---- VQA accuracy (VQAv2, VizWiz, TextVQA) -------------------------------------------------------

# The VQA challenge's table, verbatim. Words are lowercased before the lookup, so its few capitalised
# keys ("Im", "Ive", ...) never match; they are kept so the table stays the official one.
# fmt: off
CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    'hasnt': "hasn't", 'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    'hes': "he's", 'howd': "how'd", 'howll': "how'll", 'hows': "how's", "Id've": "I'd've",
    "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", 'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't",
    'mustve': "must've", 'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock",
    'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll", 'somebodys': "somebody's",
    'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've",
    'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've",
    'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's", 'whatve': "what've",
    'whens': "when's", 'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've",
    'whyll': "why'll", 'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've",
    'wouldnt': "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    'youll': "you'll", 'youre': "you're", 'youve': "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# fmt: on
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_DIGIT_COMMAS_DIGIT = re.compile(r"\d,+\d")  # the EvalAI processor's variant of the comma rule
_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) where re.sub expects its count argument.
MAX_PERIODS = int(re.UNICODE)
VQA_MODES = ("official", "llava", "m4c")


def clean_whitespace(text: str) -> str:
    """Step 1: newline and tab become spaces, then the ends are stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str, comma_rule: re.Pattern = _DIGIT_COMMA_DIGIT) -> str:
    """Steps 3 and 4. Every decision looks at the text as it came in, not as it is being rewritten."""
    delete_all = comma_rule.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out, count=MAX_PERIODS)


def process_words(text: str) -> str:
    """Step 5: lowercase, number words to digits, drop articles, expand contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Steps 3-5 of the official script (on text already through step 1)."""
    return process_words(process_punctuation(text))


def evalai_answer(text: str) -> str:
    """The EvalAI answer processor (LLaVA's m4c_evaluator, lmms-eval): always normalises."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_words(process_punctuation(clean_whitespace(text), _DIGIT_COMMAS_DIGIT))


def _agreement(prediction: str, answers: Sequence[str]) -> float:
    """Step 6: mean over annotators of min(1, matches among the OTHER annotators / 3)."""
    if not answers:
        return 0.0
    per_annotator = [
        min(1.0, sum(1 for j, other in enumerate(answers) if j != i and other == prediction) / 3)
        for i in range(len(answers))
    ]
    return sum(per_annotator) / len(per_annotator)


def vqa_accuracy(prediction: str, answers: Sequence[str], mode: str = "official") -> float:
    """Accuracy of one prediction against its human answers, in [0, 1].

    ``official``: the VQA challenge script; ``llava``: EvalAI processor on the prediction, then the
    official script; ``m4c``: EvalAI processor on both sides, no exception for agreeing annotators.
    """
    if mode == "m4c":
        return _agreement(evalai_answer(prediction), [evalai_answer(a) for a in answers])
    if mode not in ("official", "llava"):
        raise ValueError(f"unknown VQA mode {mode!r}; expected one of {', '.join(VQA_MODES)}")
    prediction = clean_whitespace(evalai_answer(prediction) if mode == "llava" else prediction)
    answers = [clean_whitespace(a) for a in answers]
    if len(set(answers)) > 1:  # when every annotator wrote the same string, raw strings are compared
        prediction = normalize_answer(prediction)
        answers = [normalize_answer(a) for a in answers]
    return _agreement(prediction, answers)


# ---- GQA, POPE, ScienceQA ------------------------------------------------------------------------

GQA_MODES = ("llava", "official")


def gqa_correct(prediction: str, answer: str, mode: str = "llava") -> bool:
    """Exact match; LLaVA's conversion first applies ``rstrip(".").lower()`` to the prediction only."""
    if mode == "llava":
        prediction = prediction.rstrip(".").lower()
    elif mode != "official":
        raise ValueError(f"unknown GQA mode {mode!r}; expected one of {', '.join(GQA_MODES)}")
    return prediction == answer


def pope_answer(text: str) -> str:
    """Free text to "yes"/"no" as LLaVA does: first sentence, commas deleted, split on single spaces."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # a tuple: `"AB" in "ABCDE"` would wrongly be true
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(text: str) -> str | None:
    """The option letter a prediction names, or None. No stripping, no case folding."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def scienceqa_correct(text: str, answer_index: int, n_choices: int) -> bool:
    """A letter beyond the choices, or a failed parse, is wrong."""
    letter = scienceqa_letter(text)
    return (
        letter is not None
        and letter in SCIENCEQA_OPTIONS[:n_choices]
        and SCIENCEQA_OPTIONS.index(letter) == answer_index
    )


# ---- synthetic panels ----------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def panel_normalize(text: str) -> str:
    """Lowercase, one space between words, no trailing period: "Schedule  repair." is "schedule repair"."""
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def parse_number(text: str) -> float | None:
    """The first number in a text ("42", "about 42.5 psi"), or None."""
    found = _NUMBER.search(text)
    return float(found.group()) if found else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def character_error_rate(prediction: str, gold: str) -> float:
    """Edit distance over the gold length, case-blind (can exceed 1 for long wrong answers)."""
    prediction, gold = panel_normalize(prediction), panel_normalize(gold)
    return edit_distance(prediction, gold) / max(1, len(gold))


def judge_panel(category: str, gold: str, predicted: str | None) -> dict[str, float]:
    """Every check one answer to a panel question counts toward, by name (1.0 right, 0.0 wrong).

    ``predicted`` None (or blank) is no answer: wrong everywhere, a character error rate of 1.
    ``exact``, for every category: the answers are equal after ``panel_normalize`` (so asset codes
    compare case-blind). By category, besides: ``gauge`` - ``gauge_within_5``, the first number of the
    answer (decimals kept) within 5 of the reading; ``damage`` - ``damage_present``, the answer says
    absent ("none") or present (one of ``DAMAGE_TYPES``) as the gold does, anything else is wrong, and
    for a damaged cell ``damage_type``, the same as exact; ``asset_code`` - ``asset_code_cer``;
    ``asset_code_chat`` (the code asked in a chat, answered in a sentence) - exact is the first code in
    the reply (``ASSET_CODE``, any case) being the gold one.
    """
    said = panel_normalize(predicted) if predicted is not None and predicted.strip() else None
    wanted = panel_normalize(gold)
    if category == "asset_code_chat":
        found = ASSET_CODE.search(predicted.upper()) if said is not None else None
        return {"exact": float(found is not None and found.group() == gold.strip().upper())}
    checks = {"exact": float(said == wanted)}
    if category == "gauge":
        number = parse_number(said) if said is not None else None
        checks["gauge_within_5"] = float(number is not None and abs(number - float(wanted)) <= 5)
    elif category == "damage":
        state = "absent" if said == "none" else "present" if said in DAMAGE_TYPES else None
        checks["damage_present"] = float(state == ("absent" if wanted == "none" else "present"))
        if wanted != "none":
            checks["damage_type"] = checks["exact"]
    elif category == "asset_code":
        checks["asset_code_cer"] = character_error_rate(said, wanted) if said is not None else 1.0
    return checks


# ---- pairing predictions with gold and summarising -----------------------------------------------


@dataclass
class Gold:
    """One question's gold: ``key`` pairs it with a prediction; ``categories`` name its breakdowns."""

    key: str
    answer: Any  # answers list (VQA), string (GQA, panels), "yes"/"no" (POPE), (index, n_choices) (ScienceQA)
    categories: dict[str, str] = field(default_factory=dict)


ID_SAMPLE = 20  # how many offending ids a result lists; the counts are always complete


def _percent(fraction_sum: float, n: int, rounding: str) -> float:
    """Percent as each official tool computes and prints it (the order of operations moves the last bit)."""
    if n == 0:
        return 0.0
    if rounding == "vqa":  # round(100 * sum / len, 2)
        return round(100 * fraction_sum / n, 2)
    return round(fraction_sum / n * 100, 2)  # m4c, GQA, ScienceQA: 100 * mean, printed with "%.2f"


def _interval(scores: Sequence[float], scale: float = 100.0, digits: int = 2) -> list[float]:
    low, high = bootstrap_interval(scores)
    return [round(low * scale, digits), round(high * scale, digits)]


def _summary(scores: Sequence[float], rounding: str = "mean") -> dict:
    return {
        "n": len(scores),
        "value": _percent(sum(scores), len(scores), rounding),
        "interval": _interval(scores),
    }


def _breakdowns(golds: Sequence[Gold], scores: Sequence[float], rounding: str = "mean") -> dict:
    """Per category: {breakdown: {category: {n, value, interval}}}, categories sorted by name."""
    grouped: dict[str, dict[str, list[float]]] = {}
    for gold, value in zip(golds, scores, strict=True):
        for name, category in gold.categories.items():
            grouped.setdefault(name, {}).setdefault(str(category), []).append(value)
    return {
        name: {cat: _summary(vals, rounding) for cat, vals in sorted(cats.items())}
        for name, cats in grouped.items()
    }


def answered(text: str | None) -> bool:
    """A prediction that says something: an empty or blank one scores 0 like a missing one."""
    return text is not None and text.strip() != ""


def _result(metric: str, golds: Sequence[Gold], scores: Sequence[float], rounding: str) -> dict:
    return {
        "metric": metric,
        **_summary(scores, rounding),
        "per_category": _breakdowns(golds, scores, rounding),
    }


def score_vqa(golds: Sequence[Gold], predictions: Mapping[str, str | None], mode: str) -> dict:
    scores = [
        vqa_accuracy(predictions[g.key], g.answer, mode) if answered(predictions.get(g.key)) else 0.0
        for g in golds
    ]
    return _result("accuracy", golds, scores, "mean" if mode == "m4c" else "vqa")


def score_gqa(golds: Sequence[Gold], predictions: Mapping[str, str | None], mode: str) -> dict:
    scores = [
        float(answered(predictions.get(g.key)) and gqa_correct(predictions[g.key], g.answer, mode))
        for g in golds
    ]
    return _result("accuracy", golds, scores, "mean")


def score_scienceqa(golds: Sequence[Gold], predictions: Mapping[str, str | None], mode: str) -> dict:
    scores = [
        float(answered(predictions.get(g.key)) and scienceqa_correct(predictions[g.key], *g.answer))
        for g in golds
    ]
    return _result("accuracy", golds, scores, "mean")


def _pope_counts(rows: np.ndarray) -> dict:
    """Confusion counts of rows (predicted yes, label yes) with yes as the positive class."""
    pred, label = rows[:, 0].astype(bool), rows[:, 1].astype(bool)
    return {
        "tp": int(np.sum(pred & label)),
        "fp": int(np.sum(pred & ~label)),
        "tn": int(np.sum(~pred & ~label)),
        "fn": int(np.sum(~pred & label)),
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_metrics(rows: np.ndarray) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio as fractions; a zero denominator gives 0."""
    c = _pope_counts(rows)
    n = c["tp"] + c["fp"] + c["tn"] + c["fn"]
    precision, recall = _ratio(c["tp"], c["tp"] + c["fp"]), _ratio(c["tp"], c["tp"] + c["fn"])
    return {
        "accuracy": _ratio(c["tp"] + c["tn"], n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(c["tp"] + c["fp"], n),
        **c,
    }


def _pope_percent(fraction: float) -> float:
    """LLaVA prints POPE fractions with "%.3f"; the same digits as a percentage."""
    return float(Decimal(f"{fraction:.3f}") * 100)


POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def score_pope(golds: Sequence[Gold], predictions: Mapping[str, str | None], mode: str) -> dict:
    splits: dict[str, list[tuple[int, int]]] = {}
    for g in golds:
        label = g.answer != "no"
        text = predictions.get(g.key)
        # A missing or empty answer is counted as the wrong one, so it scores 0 like everywhere else.
        said_yes = (pope_answer(text) == "yes") if answered(text) else not label
        splits.setdefault(g.categories.get("split", "all"), []).append((int(said_yes), int(label)))
    groups = {name: np.asarray(rows, dtype=np.int64) for name, rows in sorted(splits.items())}
    per_split = {}
    for name, rows in groups.items():
        m = pope_metrics(rows)
        low, high = bootstrap_statistic([rows], lambda g: pope_metrics(g[0])["f1"])
        per_split[name] = {
            "n": len(rows),
            **{k: _pope_percent(m[k]) for k in POPE_METRICS},
            **{k: m[k] for k in ("tp", "fp", "tn", "fn")},
            "value": _pope_percent(m["f1"]),
            "interval": [round(100 * low, 2), round(100 * high, 2)],
        }
    fractions = [pope_metrics(rows) for rows in groups.values()]
    mean = {k: sum(f[k] for f in fractions) / len(fractions) if fractions else 0.0 for k in POPE_METRICS}
    low, high = bootstrap_statistic(
        list(groups.values()), lambda gs: float(np.mean([pope_metrics(g)["f1"] for g in gs]))
    )
    return {
        "metric": "f1",
        "n": len(golds),
        "value": _pope_percent(mean["f1"]),
        "interval": [round(100 * low, 2), round(100 * high, 2)],
        "mean_over_splits": {k: _pope_percent(v) for k, v in mean.items()},
        "per_category": {"split": per_split},
    }


# The panels' extra results: each names a check of ``judge_panel``, over the questions it applies to.
PANEL_EXTRAS = {"gauge_within_5": "gauge_within_5", "damage_presence_accuracy": "damage_present",
                "damage_type_accuracy": "damage_type"}


def score_panels(golds: Sequence[Gold], predictions: Mapping[str, str | None], mode: str) -> dict:
    scores, checks = [], {}
    for g in golds:
        text = predictions.get(g.key)
        judged = judge_panel(g.categories.get("category", ""), g.answer, text if answered(text) else None)
        scores.append(judged.pop("exact"))
        for name, value in judged.items():
            checks.setdefault(name, []).append(value)
    cer = checks.get("asset_code_cer", [])
    result = _result("accuracy", golds, scores, "mean")
    result["extra"] = {
        **{name: _summary(checks.get(check, [])) for name, check in PANEL_EXTRAS.items()},
        "asset_code_cer": {
            "n": len(cer),
            "value": round(float(np.mean(cer)), 4) if cer else 0.0,
            "interval": _interval(cer, scale=1.0, digits=4),
        },
    }
    return result


def ids(keys: Sequence[str]) -> dict:
    """A count of offending ids and the first ``ID_SAMPLE`` of them."""
    return {"count": len(keys), "ids": list(keys[:ID_SAMPLE])}
