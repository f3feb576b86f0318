"""Synthetic equipment-inspection panels with known ground truth, written as LLaVA training and eval data.

``generate_panel(seed, index, size)`` draws one panel and returns its ground truth;
``write_dataset(out_dir, n, seed, size)`` writes a folder in the formats of shared/formats.md:
``images/``, ``meta.jsonl`` (truth and report per panel), ``captions.json`` (stage 1),
``instruct.json`` (stage 2) and ``questions.jsonl`` (eval, with gold answers). The rules deriving
severity and action are in ``vlm.inspection.assess``.
"""

import contextlib
import json
import multiprocessing
import random
from pathlib import Path

from tqdm import tqdm

from vlm.inspection import (
    ACTIONS,
    DAMAGE_TYPES,
    LAMP_LABELS,
    LOCATIONS,
    NOUN,
    REPORT_FIELDS,
    REPORT_PROMPTS,
    SEVERITIES,
    assess,
    make_report,
)
from vlm.synth.panels import generate_panel

__all__ = ["ACTIONS", "CATEGORIES", "DAMAGE_TYPES", "LAMP_LABELS", "LOCATIONS", "REPORT_FIELDS", "SEVERITIES",
           "assess", "damage_question", "generate_panel", "make_report", "panel_texts", "write_dataset"]

CATEGORIES = ("asset_code", "lamp", "gauge", "damage", "warning", "severity", "action")
SHORT = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPTS = ("Describe the panel briefly.", "Give a short caption of this equipment panel.",
                   "Summarize what the image shows.", "Write a one-sentence description of the panel.",
                   "What does this image show? Answer briefly.", "Provide a brief caption for this inspection photo.")
DETAIL_PROMPTS = ("Describe this equipment panel in detail.", "Give a detailed description of the panel and its condition.",
                  "Walk me through everything visible on this panel.")


def _lamp_text(lamp: dict) -> str:
    return f"{lamp['label']} ({lamp['colour']}) {'on' if lamp['on'] else 'off'}"


def _damage_text(damage: list[dict]) -> str:
    return " and ".join(f"{NOUN[d['type']]} at the {d['location']}" for d in damage) or "no visible damage"


def damage_question(where: str, kind: str, rng: random.Random) -> tuple[str, str, str]:
    """The damage question about one cell of the 3x3 grid: (question, short answer, full sentence);
    ``kind`` is a damage type or "none"."""
    return (rng.choice((f"What type of damage is visible at the {where} of the panel?",
                        f"What damage, if any, is at the {where} of the panel?")),
            kind, f"There is {NOUN[kind]} at the {where}." if kind != "none" else f"The {where} shows no damage.")


def panel_questions(report: dict, rng: random.Random) -> dict[str, tuple[str, str, str]]:
    """Per category: (question, short gold answer, full-sentence answer), phrasings drawn with ``rng``."""
    lamp = rng.choice(report["lamps"])
    # Ask about a damaged cell most of the time but not always, so the wording never leaks the answer.
    damaged = {d["location"]: d["type"] for d in report["damage"]}
    where = rng.choice(sorted(damaged, key=LOCATIONS.index)) if damaged and rng.random() < 0.7 else rng.choice(LOCATIONS)
    kind = damaged.get(where, "none")
    sev, action, notes = report["overall_severity"], report["recommended_action"], report["notes"]
    return {
        "asset_code": (rng.choice(("What is the asset code?", "What is the asset code on the tag?",
                                   "Which asset code is printed on the plate?", "Read the asset tag. What is the code?")),
                       report["asset_code"], f"The asset tag reads {report['asset_code']}."),
        # Asked as people ask, not in two set forms only: a model tuned on those takes "Is the FAULT lamp on?"
        # for a question about another lamp.
        "lamp": (rng.choice((f"Is the {lamp['label']} lamp on or off?", f"What is the state of the {lamp['label']} lamp?",
                             f"Is the {lamp['label']} lamp on?", f"Is the {lamp['label']} lamp lit?")),
                 "on" if lamp["on"] else "off",
                 f"The {lamp['label']} lamp ({lamp['colour']}) is {'lit' if lamp['on'] else 'off'}."),
        "gauge": (rng.choice(("What does the gauge read?", "What value is the gauge needle pointing to?",
                              "What is the gauge reading on its 0-100 scale?")),
                  str(report["gauge_reading"]), f"The gauge reads {report['gauge_reading']} on its 0-100 scale."),
        "damage": damage_question(where, kind, rng),
        "warning": (rng.choice(("Is there a warning label on the panel?", "Does the panel carry a yellow warning sticker?")),
                    "yes" if report["warning_label"] else "no",
                    "Yes, a yellow warning triangle is stuck on the panel." if report["warning_label"]
                    else "No, there is no warning label."),
        "severity": (rng.choice(("What is the overall severity of this panel's condition?",
                                 "How severe is the condition of this panel?")),
                     sev, f"The overall severity is {sev}: {notes}."),
        "action": (rng.choice(("What action is recommended for this panel?", "What should be done about this equipment?")),
                   action, f"Recommended action: {action} (severity {sev})."),
    }


def _caption(report: dict, rng: random.Random) -> str:
    code, gauge = report["asset_code"], report["gauge_reading"]
    lit = [lamp["label"] for lamp in report["lamps"] if lamp["on"]]
    lit_text = f"{', '.join(lit)} lit" if lit else "no lamps lit"
    warning = "warning label present" if report["warning_label"] else "no warning label"
    damage = _damage_text(report["damage"])
    return rng.choice((
        f"Equipment panel {code} with gauge at {gauge}, {lit_text}, {damage}.",
        f"Inspection photo of panel {code}: {len(report['lamps'])} indicator lamps ({lit_text}), gauge reading {gauge}, {warning}.",
        f"Control panel tagged {code}; {damage}; gauge {gauge}; {lit_text}.",
        f"A metal panel labelled {code} showing {', '.join(map(_lamp_text, report['lamps']))} and a gauge at {gauge}.",
    ))


def _detail(report: dict) -> str:
    zone = " (red zone)" if report["gauge_reading"] > 90 else " (amber zone)" if report["gauge_reading"] > 75 else ""
    parts = [f"The image shows an equipment panel. The asset tag at the top reads {report['asset_code']}.",
             f"An analog gauge on a 0-100 scale reads {report['gauge_reading']}{zone}.",
             f"There are {len(report['lamps'])} indicator lamps: {', '.join(map(_lamp_text, report['lamps']))}.",
             "A yellow warning triangle is present." if report["warning_label"] else "There is no warning label.",
             f"Damage: {_damage_text(report['damage'])}."]
    if report["overall_severity"] == "none":
        parts.append("Nothing is abnormal, so no action is needed.")
    else:
        parts.append(f"Overall severity: {report['overall_severity']} ({report['notes']}). "
                     f"Recommended action: {report['recommended_action']}.")
    return " ".join(parts)


def panel_texts(truth: dict, seed: int, index: int) -> dict:
    """Caption, instruction conversations and eval questions of one panel (deterministic in seed, index)."""
    rng = random.Random(f"vlm.synth.text:{seed}:{index}")
    report, pid = make_report(truth), truth["id"]
    image = f"images/{pid}.png"
    caption = {"id": pid, "image": image, "conversations": [
        {"from": "human", "value": rng.choice(CAPTION_PROMPTS) + "\n<image>"},
        {"from": "gpt", "value": _caption(report, rng)}]}
    qa = panel_questions(report, rng)
    short = rng.sample(CATEGORIES, 2)
    chat = rng.sample(CATEGORIES, rng.randint(2, 3))

    def turns(cats: list[str], long: bool, suffix: str) -> list[dict]:
        out = []
        for cat in cats:
            question, answer, sentence = qa[cat]
            out += [{"from": "human", "value": question + suffix}, {"from": "gpt", "value": sentence if long else answer}]
        out[0]["value"] = "<image>\n" + out[0]["value"]
        return out

    instruct = [
        {"id": f"{pid}_qa", "image": image, "conversations": turns(short, False, SHORT)},
        {"id": f"{pid}_detail", "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(DETAIL_PROMPTS)}, {"from": "gpt", "value": _detail(report)}]},
        {"id": f"{pid}_chat", "image": image, "conversations": turns(chat, True, "")},
        {"id": f"{pid}_report", "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(REPORT_PROMPTS)},
            {"from": "gpt", "value": json.dumps(report, sort_keys=False)}]},
    ]
    # Every category once, short answers: the most supervision one image's tokens can carry. Drawn last,
    # so the records above stay what they were for every seed.
    instruct.append({"id": f"{pid}_all", "image": image,
                     "conversations": turns(rng.sample(CATEGORIES, len(CATEGORIES)), False, SHORT)})
    questions = [{"question_id": f"{pid}_{cat}", "image": image, "text": qa[cat][0] + SHORT, "answer": qa[cat][1],
                  "category": cat} for cat in CATEGORIES]
    meta = {"id": pid, "image": image, "seed": seed, "index": index, "report": report, "camera": truth["camera"]}
    return {"meta": meta, "caption": caption, "instruct": instruct, "questions": questions}


def _write_panel(job: tuple[Path, int, int, int]) -> dict:
    out, seed, index, size = job
    image, truth = generate_panel(seed, index, size)
    texts = panel_texts(truth, seed, index)
    image.save(out / texts["meta"]["image"], format="PNG", compress_level=1)
    return texts


def write_dataset(out_dir: str | Path, n: int, seed: int, size: int = 336, workers: int = 1) -> None:
    """Write panels 0..n-1 of dataset ``seed`` into ``out_dir`` (the image folder of every JSON file in it).

    ``workers`` > 1 draws panels in that many processes; every panel depends on (seed, index) alone, so
    the bytes are the same. Worth it for thousands of panels (each process first imports the package).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    metas, captions, instruct, questions = [], [], [], []
    jobs = [(out, seed, index, size) for index in range(n)]
    parallel = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext()
    with parallel as pool:  # leaving it stops the workers, also when a panel fails
        written = pool.imap(_write_panel, jobs, chunksize=64) if pool else map(_write_panel, jobs)
        for texts in tqdm(written, total=n, desc="panels", unit="panel"):
            metas.append(texts["meta"])
            captions.append(texts["caption"])
            instruct += texts["instruct"]
            questions += texts["questions"]
    (out / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas), encoding="utf-8")
    (out / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    (out / "captions.json").write_text(json.dumps(captions, indent=1) + "\n", encoding="utf-8")
    (out / "instruct.json").write_text(json.dumps(instruct, indent=1) + "\n", encoding="utf-8")
