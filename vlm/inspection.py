"""The inspection domain: what a panel can show, the rules that grade it, and the report that records it.

One vocabulary for everything that reads or writes a report: the panel renderer (``vlm.synth``), the
schema-constrained report writer (``vlm.report``) and the evaluation (``eval.scoring``, ``eval.inspection``).
``REPORT_SCHEMA`` describes exactly what ``make_report`` writes: the same keys in the same order.
"""

from __future__ import annotations

import re

LAMP_LABELS = ("PWR", "RUN", "FAULT", "TEMP", "COMM", "ALARM")
# Fixed per label, as on real panels. FAULT and ALARM share red, PWR and RUN share green, so the
# printed label has to be read: colour alone never identifies a lamp.
LAMP_COLOURS = {"PWR": "green", "RUN": "green", "FAULT": "red", "TEMP": "amber", "COMM": "blue",
                "ALARM": "red"}
DAMAGE_TYPES = ("crack", "corrosion", "scorch", "missing_screw", "dent")
LOCATIONS = ("top-left", "top-center", "top-right", "middle-left", "center", "middle-right",
             "bottom-left", "bottom-center", "bottom-right")
SEVERITIES = ("none", "low", "medium", "high", "critical")
DAMAGE_SEVERITY = {"crack": "high", "scorch": "high", "corrosion": "medium", "dent": "medium",
                   "missing_screw": "low"}
ACTIONS = {"none": "no action needed", "low": "schedule inspection", "medium": "schedule repair",
           "high": "replace component", "critical": "isolate and shut down"}
REPORT_FIELDS = ("asset_code", "lamps", "gauge_reading", "damage", "warning_label", "overall_severity",
                 "recommended_action", "notes")
# No I, O or Q: beside digits they read as 1 and 0 at 224 px, and a code must be unambiguous.
CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
# How captions and labels name each damage type.
NOUN = {"crack": "a crack", "corrosion": "corrosion", "scorch": "a scorch mark", "missing_screw": "a missing screw",
        "dent": "a dent"}
ASSET_CODE = re.compile(rf"\b[{CODE_LETTERS}]{{2}}-\d{{4}}\b")  # two letters, a dash, four digits


def findings(lamps: list[dict], gauge_reading: int, damage: list[dict]) -> list[tuple[str, str]]:
    """Every rule of ``assess`` that fires, as (severity, reason), most severe first."""
    lit = {lamp["label"] for lamp in lamps if lamp["on"]}
    scorched = any(item["type"] == "scorch" for item in damage)
    found = []
    if "FAULT" in lit:
        found.append(("critical", "FAULT lamp lit with scorch damage") if scorched
                     else ("high", "FAULT lamp lit"))
    if "ALARM" in lit:
        found.append(("high", "ALARM lamp lit"))
    if "TEMP" in lit:
        found.append(("medium", "TEMP lamp lit"))
    if gauge_reading > 90:
        found.append(("high", f"gauge in red zone ({gauge_reading})"))
    elif gauge_reading > 75:
        found.append(("low", f"gauge elevated ({gauge_reading})"))
    for item in damage:
        kind = item["type"]
        found.append((DAMAGE_SEVERITY[kind], f"{kind.replace('_', ' ')} at {item['location']}"))
    return sorted(found, key=lambda f: -SEVERITIES.index(f[0]))


def assess(lamps: list[dict], gauge_reading: int, damage: list[dict]) -> tuple[str, str]:
    """Overall severity and recommended action of a panel.

    Every rule that matches contributes its severity; the highest one wins (order: none < low <
    medium < high < critical). No rule matching means "none". Lamps are "lit" when ``on`` is true.

    | rule | condition                                   | severity |
    |------|---------------------------------------------|----------|
    | 1    | FAULT lamp lit and any scorch damage        | critical |
    | 2    | FAULT lamp lit (no scorch)                  | high     |
    | 3    | ALARM lamp lit                              | high     |
    | 4    | gauge reading > 90 (red zone)               | high     |
    | 5    | crack or scorch damage (any location)       | high     |
    | 6    | TEMP lamp lit                               | medium   |
    | 7    | corrosion or dent damage                    | medium   |
    | 8    | gauge reading 76-90 (amber zone)            | low      |
    | 9    | missing_screw damage                        | low      |
    | 10   | none of the above                           | none     |

    PWR, RUN and COMM lamps (lit or not) and the warning label are recorded but never change the
    severity. Each damage item's own severity is rule 5/7/9 for its type (scorch stays "high" even
    when rule 1 makes the panel critical). The action follows from the overall severity alone:

    | overall severity | recommended action    |
    |------------------|-----------------------|
    | none             | no action needed      |
    | low              | schedule inspection   |
    | medium           | schedule repair       |
    | high             | replace component     |
    | critical         | isolate and shut down |
    """
    found = findings(lamps, gauge_reading, damage)
    severity = found[0][0] if found else "none"
    return severity, ACTIONS[severity]


def make_report(truth: dict) -> dict:
    """The inspection report of a panel: exactly ``REPORT_FIELDS``, in that order."""
    severity, action = assess(truth["lamps"], truth["gauge_reading"], truth["damage"])
    reasons = [reason for _, reason in findings(truth["lamps"], truth["gauge_reading"], truth["damage"])]
    return {
        "asset_code": truth["asset_code"],
        "lamps": [{"label": x["label"], "colour": x["colour"], "on": x["on"]} for x in truth["lamps"]],
        "gauge_reading": truth["gauge_reading"],
        "damage": [{"type": x["type"], "location": x["location"], "severity": DAMAGE_SEVERITY[x["type"]]}
                   for x in truth["damage"]],
        "warning_label": truth["warning_label"],
        "overall_severity": severity,
        "recommended_action": action,
        "notes": "; ".join(reasons) if reasons else "all indicators normal, no damage found",
    }


SCHEMA_VERSION = "1.0.0"
NOTES_MAX_CHARS = 200
# The characters of make_report's notes and a little more. No quote, backslash or non-ASCII: every
# character is one byte and never escaped, which keeps the longest report's length exact.
NOTES_CHARS = "A-Za-z0-9 .,;:()/%-"
SEPARATORS = (", ", ": ")  # json.dumps' defaults: the layout make_report's reports are written in


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"urn:vlm:inspection-report:{SCHEMA_VERSION}",
    "version": SCHEMA_VERSION,
    "title": "Equipment panel inspection report",
    **_object({
        "asset_code": {"type": "string", "pattern": f"^[{CODE_LETTERS}]{{2}}-[0-9]{{4}}$", "maxLength": 7,
                       "description": "the code on the asset tag: two letters (no I, O, Q), a dash, four digits"},
        "lamps": {"type": "array", "maxItems": len(LAMP_LABELS), "description": "indicator lamps, left to right",
                  "items": _object({"label": {"enum": list(LAMP_LABELS)},
                                    "colour": {"enum": list(dict.fromkeys(LAMP_COLOURS.values()))},
                                    "on": {"type": "boolean"}})},
        "gauge_reading": {"type": "integer", "minimum": 0, "maximum": 100,
                          "description": "the gauge needle on its 0-100 scale"},
        "damage": {"type": "array", "maxItems": len(LOCATIONS),
                   "description": "visible damage, at most one item per location cell; empty when none",
                   "items": _object({"type": {"enum": list(DAMAGE_TYPES)}, "location": {"enum": list(LOCATIONS)},
                                     "severity": {"enum": list(SEVERITIES[1:])}})},
        "warning_label": {"type": "boolean", "description": "a yellow warning triangle is on the panel"},
        "overall_severity": {"enum": list(SEVERITIES)},
        "recommended_action": {"enum": list(ACTIONS.values())},
        "notes": {"type": "string", "pattern": f"^[{NOTES_CHARS}]{{0,{NOTES_MAX_CHARS}}}$",
                  "maxLength": NOTES_MAX_CHARS, "description": "the findings behind the severity, free text"},
    }),
}
REPORT_PROMPTS = (
    "Inspect this panel and return the inspection report as JSON with the keys " + ", ".join(REPORT_FIELDS) + ".",
    "Produce the JSON inspection report for this panel (keys: " + ", ".join(REPORT_FIELDS) + ").",
    "Fill in the inspection report for this equipment as a JSON object with fields " + ", ".join(REPORT_FIELDS) + ".",
)
NOUN = {"crack": "a crack", "corrosion": "corrosion", "scorch": "a scorch mark", "missing_screw": "a missing screw",
        "dent": "a dent"}
