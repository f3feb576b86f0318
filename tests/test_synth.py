"""Synthetic inspection panels: determinism, file formats, rules."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.synth import CATEGORIES, LOCATIONS, REPORT_FIELDS, assess, generate_panel, make_report, write_dataset
from vlm.synth.__main__ import main

SIZE = 160  # small keeps the suite fast; the layout scales with size


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    write_dataset(out, 30, seed=5, size=SIZE)
    return out


def _load(root: Path) -> tuple[list, list, list, list]:
    meta = [json.loads(line) for line in (root / "meta.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines()]
    return (meta, json.loads((root / "captions.json").read_text()), json.loads((root / "instruct.json").read_text()),
            questions)


def test_same_seed_gives_identical_bytes(tmp_path, dataset):
    write_dataset(tmp_path / "again", 30, seed=5, size=SIZE)
    assert _files(tmp_path / "again") == _files(dataset)


def test_panels_drawn_in_two_processes_are_the_same_bytes(tmp_path, dataset):
    argv = ["--out", str(tmp_path / "parallel"), "--n", "30", "--seed", "5", "--size", str(SIZE), "--workers", "2"]
    assert main(argv) == 0
    assert _files(tmp_path / "parallel") == _files(dataset)


def test_same_seed_identical_in_a_fresh_process(tmp_path, dataset):
    # Hash randomisation or leftover global state would show up only across processes. Importing the
    # package normally pulls in torch through vlm/__init__; a bare namespace keeps this subprocess fast.
    root = Path(__file__).resolve().parents[1]
    code = ("import sys, types; m = types.ModuleType('vlm'); m.__path__ = [sys.argv[1]]; sys.modules['vlm'] = m; "
            "from vlm.synth import write_dataset; write_dataset(sys.argv[2], 3, 5, int(sys.argv[3]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(root / "vlm"), str(tmp_path / "fresh"), str(SIZE)],
                   check=True, env=env, capture_output=True)
    fresh, full = _files(tmp_path / "fresh"), _files(dataset)
    assert set(fresh) >= {"meta.jsonl", "images/panel_5_00002.png"}
    for name in ("images/panel_5_00000.png", "images/panel_5_00001.png", "images/panel_5_00002.png"):
        assert fresh[name] == full[name]
    assert fresh["meta.jsonl"].splitlines() == full["meta.jsonl"].splitlines()[:3]


def test_panel_independent_of_dataset_length(dataset):
    meta, *_ = _load(dataset)
    image, truth = generate_panel(5, 17, SIZE)
    assert make_report(truth) == meta[17]["report"]
    assert image.tobytes() == Image.open(dataset / meta[17]["image"]).tobytes()


def test_different_seeds_differ():
    a, ta = generate_panel(1, 0, SIZE)
    b, tb = generate_panel(2, 0, SIZE)
    c, _ = generate_panel(1, 1, SIZE)
    assert a.tobytes() != b.tobytes() and a.tobytes() != c.tobytes()
    assert ta["asset_code"] != tb["asset_code"]
    assert a.size == (SIZE, SIZE) and a.mode == "RGB"


def test_files_are_consistent(dataset):
    meta, captions, instruct, questions = _load(dataset)
    by_id = {m["id"]: m for m in meta}
    assert len(meta) == len(captions) == 30 and len(questions) == 30 * len(CATEGORIES)
    for record in meta + captions + instruct + questions:
        assert (dataset / record["image"]).is_file()
    for record in captions:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].endswith("\n<image>") and gpt["from"] == "gpt"
        assert by_id[record["id"]]["report"]["asset_code"] in gpt["value"]
    kinds = set()
    for record in instruct:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        kinds.add(record["id"].rsplit("_", 1)[1])
        if record["id"].endswith("_chat"):
            assert 2 <= len(turns) // 2 <= 3
        if record["id"].endswith("_all"):
            assert len(turns) // 2 == len(CATEGORIES)
    assert kinds == {"qa", "detail", "chat", "report", "all"}


def test_questions_agree_with_meta(dataset):
    meta, _, _, questions = _load(dataset)
    reports = {m["image"]: m["report"] for m in meta}
    assert {q["category"] for q in questions} == set(CATEGORIES)
    assert len({q["question_id"] for q in questions}) == len(questions)
    for q in questions:
        r, answer = reports[q["image"]], q["answer"]
        assert q["text"].endswith("\nAnswer the question using a single word or phrase.")
        expected = {"asset_code": r["asset_code"], "gauge": str(r["gauge_reading"]),
                    "warning": "yes" if r["warning_label"] else "no", "severity": r["overall_severity"],
                    "action": r["recommended_action"]}
        if q["category"] in expected:
            assert answer == expected[q["category"]]
        elif q["category"] == "lamp":
            lamp = next(x for x in r["lamps"] if f" {x['label']} lamp" in q["text"])
            assert answer == ("on" if lamp["on"] else "off")
        else:
            where = next(loc for loc in LOCATIONS if f"the {loc} of" in q["text"])
            assert answer == next((d["type"] for d in r["damage"] if d["location"] == where), "none")


def test_report_answers_parse_with_exact_fields(dataset):
    meta, _, instruct, _ = _load(dataset)
    reports = {m["image"]: m["report"] for m in meta}
    answers = [r for r in instruct if r["id"].endswith("_report")]
    assert len(answers) == 30
    for record in answers:
        report = json.loads(record["conversations"][1]["value"])
        assert tuple(report) == REPORT_FIELDS and report == reports[record["image"]]
        assert isinstance(report["gauge_reading"], int) and isinstance(report["warning_label"], bool)


def test_ground_truth_is_varied(dataset):
    meta, *_ = _load(dataset)
    reports = [m["report"] for m in meta]
    assert sum(not r["damage"] for r in reports) >= 5  # about 40% carry no damage
    assert len({r["overall_severity"] for r in reports}) >= 4
    assert all(2 <= len(r["lamps"]) <= 4 and len(r["damage"]) <= 2 for r in reports)
    assert all(len(r["asset_code"]) == 7 and r["asset_code"][2] == "-" for r in reports)


def _lamp(label: str, on: bool) -> dict:
    return {"label": label, "colour": "red", "on": on}


def _damage(kind: str, location: str = "center") -> dict:
    return {"type": kind, "location": location}


@pytest.mark.parametrize("lamps, gauge, damage, expected", [
    ([_lamp("FAULT", True)], 50, [_damage("scorch")], ("critical", "isolate and shut down")),
    ([_lamp("FAULT", False), _lamp("PWR", True)], 50, [_damage("scorch")], ("high", "replace component")),
    ([_lamp("FAULT", True)], 50, [], ("high", "replace component")),
    ([_lamp("ALARM", True)], 10, [], ("high", "replace component")),
    ([_lamp("PWR", True)], 91, [], ("high", "replace component")),
    ([_lamp("PWR", True)], 90, [], ("low", "schedule inspection")),
    ([_lamp("PWR", True)], 76, [], ("low", "schedule inspection")),
    ([_lamp("PWR", True)], 75, [], ("none", "no action needed")),
    ([_lamp("RUN", True)], 20, [_damage("crack", "top-left")], ("high", "replace component")),
    ([_lamp("TEMP", True)], 20, [], ("medium", "schedule repair")),
    ([_lamp("PWR", True)], 20, [_damage("corrosion")], ("medium", "schedule repair")),
    ([_lamp("PWR", True)], 20, [_damage("dent")], ("medium", "schedule repair")),
    ([_lamp("PWR", True)], 20, [_damage("missing_screw", "top-left")], ("low", "schedule inspection")),
    ([_lamp("PWR", False), _lamp("RUN", True), _lamp("COMM", True)], 0, [], ("none", "no action needed")),
    # Highest wins: a missing screw does not soften a crack, nor a TEMP lamp a red-zone gauge.
    ([_lamp("TEMP", True)], 95, [_damage("missing_screw", "top-left"), _damage("crack")], ("high", "replace component")),
])
def test_assess_rules(lamps, gauge, damage, expected):
    assert assess(lamps, gauge, damage) == expected


def test_make_report_fields_and_notes():
    truth = {"asset_code": "KX-4821", "lamps": [_lamp("FAULT", True), _lamp("PWR", True)], "gauge_reading": 42,
             "damage": [_damage("scorch", "top-left")], "warning_label": True}
    report = make_report(truth)
    assert tuple(report) == REPORT_FIELDS
    assert report["overall_severity"] == "critical" and report["recommended_action"] == "isolate and shut down"
    assert report["damage"] == [{"type": "scorch", "location": "top-left", "severity": "high"}]
    assert "FAULT" in report["notes"]
    calm = make_report({**truth, "lamps": [_lamp("PWR", True)], "damage": []})
    assert calm["overall_severity"] == "none" and calm["notes"]


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--n", "x"], "invalid int value"),
    (["--n", "2", "--size", "32"], "--size must be at least"),
    (["--n", "2", "--workers", "0"], "--workers must be at least 1"),
])
def test_cli_rejects_bad_input(tmp_path, capsys, argv, message):
    assert main(["--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_file_as_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file"), "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and err.count("\n") == 1


def test_cli_writes_dataset(tmp_path):
    assert main(["--out", str(tmp_path / "out"), "--n", "2", "--seed", "3", "--size", "128"]) == 0
    assert {"meta.jsonl", "captions.json", "instruct.json", "questions.jsonl", "images/panel_3_00001.png"} <= set(
        _files(tmp_path / "out"))


def test_layout_points_at_what_is_drawn():
    """The recorded layout lands on the drawn facts: lit lamps show their colour, code characters have ink."""
    checked = 0
    for index in range(12):
        image, truth = generate_panel(7, index, 336)
        pixels = np.asarray(image, dtype=np.float32)
        layout = truth["camera"]["layout"]
        assert all(0 <= v < 336 for points in layout.values() for point in points for v in point)
        xs = [x for x, _ in layout["code"]]
        assert xs == sorted(xs) and len(xs) == len(truth["asset_code"])
        for (x, y), char in zip(layout["code"], truth["asset_code"], strict=True):
            if char != "-":
                patch = pixels[int(y) - 10:int(y) + 11, int(x) - 9:int(x) + 10].mean(-1)  # wide enough for a U
                assert patch.max() - patch.min() > 60, (index, char)  # ink against the plate
        for (x, y), lamp in zip(layout["lamps"], truth["lamps"], strict=True):
            if lamp["on"] and lamp["colour"] in ("green", "blue"):
                r, g, b = pixels[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3].reshape(-1, 3).mean(0)
                assert (g if lamp["colour"] == "green" else b) > r + 40, (index, lamp)
                checked += 1
    assert checked >= 5


def test_code_characters_get_a_patch_each_at_128_px():
    """The demo tower sees 128 px in 8-px patches: no two code characters may be centred in the same patch."""
    for index in range(40):
        _, truth = generate_panel(11, index, 128)
        xs = np.array(truth["camera"]["layout"]["code"])[:, 0]
        assert np.diff(xs).min() > 8, index  # more than a patch apart across, so never in one column


def test_code_print_fills_most_of_the_plate_height():
    """The print is stretched upright: its ink spans more than half of the tag plate's height (0.4 unstretched)."""
    from vlm.synth.panels import _draw_panel, sample_truth
    for index in range(6):
        truth = sample_truth(random.Random(index)) | {"damage": [], "warning_label": False}
        panel, _ = _draw_panel(truth, 200, 200, random.Random(index))
        # The plate spans rows 13-60 of this panel; its middle columns hold only the code.
        plate = np.asarray(panel.convert("RGB"), dtype=np.float32)[16:58, 40:160]
        background = np.median(plate.reshape(-1, 3), axis=0)
        inked_rows = np.flatnonzero((np.abs(plate - background).sum(-1) > 150).any(1))
        assert inked_rows[-1] - inked_rows[0] + 1 > 0.5 * (60 - 13), (index, inked_rows)
