"""Rewrite the generated regions of README.md, docs/*.md and benchmarks/README.md from the results files.

    python tools/render_docs.py            # rewrite the regions in place
    python tools/render_docs.py --check    # exit 1 naming each region that differs from its files

A region is ``<!-- results:NAME -->...<!-- /results -->``; NAME picks a renderer below. Numbers in the
docs come from here, so they cannot drift from models/demo/results/*.json and benchmarks/*results.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGION = re.compile(r"<!-- results:([\w-]+) -->(.*?)<!-- /results -->", re.S)
DEMO = "models/demo/results"
CATEGORIES = {"lamp": "lamp state", "damage_present": "damage present / absent", "damage_type": "damage type",
              "asset_code": "asset code, short answer", "asset_code_chat": "asset code in a chat reply",
              "action": "recommended action", "gauge_within_5": "gauge within +/-5", "severity": "severity",
              "warning": "warning label"}
TARGETS = {"lamp": 95, "damage_present": 95, "damage_type": 90, "asset_code": 80, "action": 90,
           "gauge_within_5": 80}  # the demo's goals, set before it was built (not measured)


class DocsError(ValueError):
    """A doc or results file the generator cannot use; the message names it."""


def _json(root: Path, path: str) -> dict:
    try:
        return json.loads((root / path).read_text())
    except (OSError, ValueError) as error:
        raise DocsError(f"{path}: cannot read it as JSON ({error})") from None


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _interval(m: dict, scale: float = 1) -> str:
    low, high = m["interval"]
    return f"{scale * m['value']:.2f} [{scale * low:.2f}, {scale * high:.2f}]"


def panels(root: Path) -> str:
    r = _json(root, f"{DEMO}/panels.json")
    labels = {"action": "recommended action", "asset_code": "asset code, exact", "damage": "damage at a named cell",
              "gauge": "gauge, exact", "lamp": "lamp state", "severity": "severity", "warning": "warning label",
              "gauge_within_5": "gauge within +/-5", "damage_presence_accuracy": "damage present / absent",
              "damage_type_accuracy": "damage type (damaged cells)",
              "asset_code_cer": "asset-code character error rate"}
    parts = {"all questions": r, **r["per_category"]["category"], **r.get("extra", {})}
    scaled = {"asset_code_cer": 100}  # a 0-1 rate: shown in % like the rest
    return _table(["category", "% [95% interval]", "n"],
                  [[labels.get(k, k), _interval(m, scaled.get(k, 1)), f"{m['n']:,}"] for k, m in parts.items()])


def inspection(root: Path) -> str:
    metrics = _json(root, f"{DEMO}/inspection.json")["metrics"]
    shown = {"schema_valid": "schema-valid reports", "asset_code_exact": "asset code exact match",
             "asset_code_cer": "asset code character error rate", "lamp_state_accuracy": "lamp state accuracy",
             "gauge_mae": "gauge mean absolute error", "severity_accuracy": "overall severity accuracy",
             "action_accuracy": "recommended action accuracy",
             "false_damage_rate_clean": "false-damage rate on clean panels",
             "damage.type.overall.f1": "damage F1, type only", "damage.type_location.overall.f1":
             "damage F1, type + location"}
    return _table(["metric", "value [95% interval]", "unit", "n"],
                  [[label, _interval(metrics[k]), metrics[k]["unit"], metrics[k]["n"]] for k, label in shown.items()])


def benchmarks(root: Path) -> str:
    rows = []
    for row in _json(root, "benchmarks/results.json")["rows"]:
        ratio = row["ratio"]
        spread = "1 repeat" if ratio["n"] == 1 else f"{ratio['min']:.3f}-{ratio['max']:.3f}"
        verdict = "" if row["passed"] is None else "pass" if row["passed"] else "**miss**"
        rows.append([row["name"], f"{ratio['median']:.3f} [{spread}]", row["target"] or "-", verdict])
    return _table(["row (project / baseline)", "ratio, median [min-max]", "target", ""], rows)


LLAVA_RECORDS = 665_000  # LLaVA-1.5's instruction mix: the data targets are for a run of this size
DATA_TARGETS = {"uncached_cpu_min": 15, "cached_s": 60, "resume_s": 60, "memory_mb_at_1m": 2048}


def _k(records: int) -> str:
    return f"{records / 1000:g}K" if records < 1_000_000 else f"{records / 1_000_000:g}M"


def _each(rows: list[dict], key: str, form: str = "{}") -> str:
    return " / ".join(form.format(row[key]) for row in rows)


def _verdict(passed: bool) -> str:
    return "pass" if passed else "**miss**"


def data(root: Path) -> str:
    r = _json(root, "benchmarks/data_results.json")
    runs, records, t = r["runs"], r["settings"]["records"], DATA_TARGETS
    scale = LLAVA_RECORDS / records  # linear: an upper bound for the cached starts, whose cost is partly fixed
    at = "" if records == LLAVA_RECORDS else f"{_k(LLAVA_RECORDS)}, linear: "

    def projected(value: float, unit: str) -> str:
        return "" if not at else f" ({at}~{value * scale:.{0 if value * scale >= 20 else 1}f} {unit})"

    rates = r["preflight"]
    rows = [[f"preflight, {_each(rates, 'workers')} process(es) ({rates[0]['records']:,} records)",
             f"{_each(rates, 'records_per_s', '{:.0f}')} records/s, {rates[0]['cpu_ms_per_record']:.2f} CPU-ms "
             f"a record ({_k(LLAVA_RECORDS)}: {rates[0]['cpu_ms_per_record'] * LLAVA_RECORDS / 60_000:.1f} CPU-min)",
             "-", ""]]
    uncached_min = runs["uncached_cpu_s"] / 60
    rows.append([f"first step, {_k(records)} records, preflight not cached",
                 f"{runs['uncached_first_step_s']:.0f} s wall, {uncached_min:.1f} CPU-min"
                 + projected(uncached_min, "CPU-min"), f"<= {t['uncached_cpu_min']} CPU-min at {_k(LLAVA_RECORDS)}",
                 _verdict(uncached_min * scale <= t["uncached_cpu_min"])])
    for key, label, target in (("cached_first_step_s", "first step, {} records, preflight cached", "cached_s"),
                               ("resume_next_step_s", "resume, {} records: launch to the next step", "resume_s")):
        rows.append([label.format(_k(records)), f"{runs[key]:.1f} s" + projected(runs[key], "s"),
                     f"<= {t[target]} s", _verdict(runs[key] * scale <= t[target])])
    loader = r["loader"]
    rows.append([f"loader, 8-sample batches, {_each(loader, 'workers')} workers",
                 f"{_each(loader, 'samples_per_s', '{:.0f}')} samples/s", "-", ""])
    memory = r["memory"]
    largest = memory[-1]
    rows.append([f"peak RSS of the data pipeline, {' / '.join(_k(m['records']) for m in memory)} records (over "
                 f"{largest['base_mb']:.0f} MB of imports and model)",
                 f"{_each(memory, 'data_mb', '+{:.0f}')} MB ({_k(largest['records'])}: "
                 f"{largest['peak_mb']:.0f} MB in all)", f"<= {t['memory_mb_at_1m'] // 1024} GB at 1M",
                 _verdict(largest["records"] >= 1_000_000 and largest["peak_mb"] <= t["memory_mb_at_1m"])])
    return _table(["row", "measured", "target", ""], rows)


def demo_stages(root: Path) -> str:
    m = _json(root, f"{DEMO}/recipe.json")["metrics"]
    cols = [m["language_model"]["held_out_from_true_twins"], m["before_stage1"], m["after_stage1"], m["after_stage2"]]
    return _table(["category (n)", "LM from the exact twin", "before stage 1", "after stage 1", "after stage 2",
                   "goal"], [[f"{label} ({cols[-1]['n_' + k]})", *(_pct(c[k]) for c in cols), TARGETS.get(k, "-")]
                             for k, label in CATEGORIES.items()])


def demo_reading(root: Path) -> str:
    m = _json(root, f"{DEMO}/recipe.json")["metrics"]
    heads, proj = m["tower"]["field_heads_heldout"], m["distil_projector"]["held_out"]
    rows = {"code letters": ("code_letter", "code_letter"), "code digits": ("code_digit", "code_digit"),
            "whole codes": ("code_pooled_exact", "code_exact"), "lamps (label + state)": ("lamp", "lamp"),
            "gauge within +/-5": ("gauge", "gauge_within_5"), "cells, damage type": ("damage", "damage"),
            "damaged cells seen as damaged": ("damage_recall", "damage_recall"), "warning": ("warning", "warning")}
    return _table(["fact", "tower's heads", "distilled projector, nearest twin token"],
                  [[label, _pct(heads[a]), _pct(proj[b])] for label, (a, b) in rows.items()])


def demo_curve(root: Path) -> str:
    curve = _json(root, f"{DEMO}/recipe.json")["metrics"]["tower"]["held_out_curve"]
    keys = ["code_letter", "code_digit", "code_pooled_exact", "lamp", "gauge", "damage_recall"]
    return _table(["tower step", "letters", "digits", "whole codes", "lamps", "gauge +/-5", "damaged cells seen"],
                  [[f"{p['step']:,}", *(_pct(p[k]) for k in keys)] for p in curve])


def demo_lm(root: Path) -> str:
    rounds = _json(root, f"{DEMO}/recipe.json")["metrics"]["language_model"]["instruction_rounds"]
    keys = ["asset_code", "asset_code_chat", "lamp", "damage_present", "damage_type", "action", "gauge_within_5",
            "report_asset_code"]
    return _table(["round", "steps", "s", "code", "code, chat", "lamp", "damage", "type", "action", "gauge",
                   "code in reports"], [[r.get("round", 0), f"{r['steps']:,}", r.get("seconds", "-"),
                                         *(_pct(r["answers"][k]) for k in keys)] for r in rounds])


def demo_time(root: Path) -> str:
    recipe = _json(root, f"{DEMO}/recipe.json")
    rows = [[step.replace("_", " "), f"{s:,.1f}"] for step, s in recipe["steps"].items()]
    return _table(["step", "seconds"], rows + [["**total**", f"{recipe['total_seconds']:,.1f} "
                                               f"({recipe['total_seconds'] / 60:.1f} min)"]])


def demo_summary(root: Path) -> str:
    recipe, panels_ = _json(root, f"{DEMO}/recipe.json"), _json(root, f"{DEMO}/panels.json")
    m, tower = recipe["metrics"], recipe["metrics"]["tower"]
    return (f"{m['model_megabytes']} MB, built in {recipe['total_seconds'] / 60:.1f} min; its tower saw "
            f"{tower['images_seen']:,} images ({tower['steps']:,} steps). Asked the asset code of "
            f"`examples/panel.jpg` (truth `{m['example']['truth']}`) it answers `{m['example']['answer']}`; "
            f"the panels benchmark: {panels_['value']:.2f}% [{panels_['interval'][0]:.2f}, "
            f"{panels_['interval'][1]:.2f}] of {panels_['n']:,} held-out questions.")


DECODING = "benchmarks/decoding_results.json"


def _mb(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _probe_note(probe: dict, edge_cases: list[dict], reports: int) -> str:
    """What the probe found: right/wrong edge cases (named), rejected reports, the schema it needed, warnings."""
    if "edge_accepted" not in probe:
        return probe["errors"][-1]
    wrong = [(case["label"], accepted) for case, accepted in zip(edge_cases, probe["edge_accepted"], strict=True)
             if accepted != case["valid"]]
    said = [f"all {len(edge_cases)} right" if not wrong else f"{len(edge_cases) - len(wrong)}/{len(edge_cases)} right"]
    for verb, value in (("accepts", True), ("rejects", False)):
        if named := [label for label, accepted in wrong if accepted == value]:
            said.append(f"{verb} {', '.join(named)}")
    if probe["good_accepted"] < reports:
        said.append(f"rejects {reports - probe['good_accepted']} of the {reports} reports")
    if probe["schema_form"] != "as is":
        said.append(f"needs {probe['schema_form']} (as is: {probe['errors'][0].removeprefix('as is: ')})")
    said += [f"warns: {warning}" for warning in probe.get("warnings", [])]
    return "; ".join(said)


def decoding_candidates(root: Path) -> str:
    r = _json(root, DECODING)
    rows = []
    for c in r["candidates"]:
        probe, size = c["probe"], c["size"]
        version = probe.get("version") or (size or {}).get("version", "")
        others = [] if size is None else [f"{n} {_mb(mb)}" for n, _, mb in size["added"] if n != size["distribution"]]
        more = f", {len(others) - 3} more" if len(others) > 3 else ""  # the largest three name the cost
        added = "-" if size is None else ", ".join(others[:3]) + more if others else "none"
        layouts = probe.get("layouts_accepted")
        layout = "-" if layouts is None else "exact" if not any(layouts.values()) else \
            "also " + ", ".join(k for k, n in layouts.items() if n)
        rows.append([f"{c['name']} {version}".strip(), "-" if size is None else _mb(size["mb"]), added,
                     _probe_note(probe, r["edge_cases"], r["settings"]["reports"]), layout, c["how"]])
    return _table(["candidate", "size, MB", "added beyond vlm's closure, MB", "schema probe", "layout",
                   "how it masks"], rows)


def decoding_install(root: Path) -> str:
    r = _json(root, DECODING)
    closure, s = r["closure"], r["settings"]
    sizes = {c["name"]: c["size"] for c in r["candidates"]}
    heavy_name, _, heavy_mb = sizes["xgrammar"]["added"][0]  # its largest added distribution
    requirement = next((q for q in sizes["xgrammar"]["requires"] if q.split(";")[0].strip() == heavy_name), None)
    if requirement is None:
        raise KeyError(f"xgrammar's requirement on {heavy_name}")
    with_x, with_l = closure["mb"] + sizes["xgrammar"]["mb"], closure["mb"] + sizes["llguidance"]["mb"]
    largest = ", ".join(f"{n} {v} {mb:,.0f}" for n, v, mb in closure["largest"])
    return (f"Measured on Python {s['python']}, {s['platform']}, torch {s['torch']}, {s['threads']} thread. "
            f"vlm's own run-time closure is {closure['mb']:,.0f} MB ({closure['distributions']} distributions; "
            f"largest, MB: {largest}). A CPU install is {with_l:,.0f} MB with llguidance and {with_x:,.0f} MB "
            f"with xgrammar, whose metadata requires `{requirement}` (no extra to leave it out): "
            f"{heavy_name} is {100 * heavy_mb / with_x:.0f}% of that install.")


def decoding_speed(root: Path) -> str:
    r = _json(root, DECODING)
    timed = {name: rows for name, rows in r["speed"].items() if isinstance(rows, list)}
    names, rows = list(timed), []
    for at, first in enumerate(timed[names[0]]):
        cells = [timed[n][at] for n in names]
        rows.append([f"{first['tokenizer']}, {first['vocab']:,} ({first['tokens']:,} tokens)",
                     *(f"{c['setup_ms']:,.0f} ms" for c in cells), *(f"{c['per_token_ms']:.3f} ms" for c in cells)])
    return _table(["tokenizer", *(f"{n} set-up" for n in names), *(f"{n} per token" for n in names)], rows)


RENDERERS: dict[str, Callable[[Path], str]] = {
    "panels": panels, "inspection": inspection, "benchmarks": benchmarks, "demo-stages": demo_stages,
    "demo-reading": demo_reading, "demo-curve": demo_curve, "demo-lm": demo_lm, "demo-time": demo_time,
    "demo-summary": demo_summary, "data": data, "decoding-candidates": decoding_candidates,
    "decoding-install": decoding_install, "decoding-speed": decoding_speed}


def render(text: str, where: str, root: Path = ROOT) -> str:
    """``text`` with every region rewritten; a renderer whose output has several lines gets its own lines."""
    if text.count("<!-- results:") != len(REGION.findall(text)):
        raise DocsError(f"{where}: a '<!-- results:NAME -->' marker has no '<!-- /results -->' after it")

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in RENDERERS:
            raise DocsError(f"{where}: unknown region 'results:{name}' (known: {', '.join(RENDERERS)})")
        try:
            body = RENDERERS[name](root)
        except (KeyError, IndexError, TypeError) as error:  # a results file of another shape
            raise DocsError(f"{where}: region 'results:{name}': its results file lacks {error}") from None
        body = f"\n{body}\n" if "\n" in body else body
        return f"<!-- results:{name} -->{body}<!-- /results -->"

    return REGION.sub(fill, text)


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "README.md"]


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a region is out of date")
    args = parser.parse_args(argv)
    stale = []
    try:
        for path in doc_files(root):
            text = path.read_text()
            new = render(text, str(path.relative_to(root)), root)
            if new != text:
                stale.append(str(path.relative_to(root)))
                if not args.check:
                    path.write_text(new)
    except DocsError as error:
        print(f"render_docs: error: {error}", file=sys.stderr)
        return 2
    verb = "out of date" if args.check else "rewrote"
    print(f"render_docs: {verb}: {', '.join(stale)}" if stale else "render_docs: up to date")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
