"""eval.inspection: scoring worked out by hand, and the command over a vlm.synth folder."""

import copy
import json

import pytest
import torch

from eval.inspection import main, score_reports
from vlm.synth import write_dataset


def _report(code, lamps, gauge, damage, severity, action):
    return {"asset_code": code, "lamps": [{"label": label, "colour": "green", "on": on} for label, on in lamps],
            "gauge_reading": gauge, "damage": [{"type": t, "location": loc, "severity": "high"} for t, loc in damage],
            "warning_label": False, "overall_severity": severity, "recommended_action": action, "notes": ""}


GOLD = [
    _report("AB-1234", [("PWR", True), ("FAULT", False)], 40, [("crack", "top-left"), ("dent", "center")],
            "high", "replace component"),
    _report("CD-5678", [("RUN", True)], 10, [], "none", "no action needed"),
    _report("EF-9012", [("ALARM", True)], 95, [], "high", "replace component"),
    _report("GH-3456", [("TEMP", False)], 0, [("missing_screw", "bottom-left")], "low", "schedule inspection"),
    _report("JK-7890", [("COMM", True), ("PWR", True)], 50, [], "none", "no action needed"),
]
PRED = [
    # one wrong character, PWR read as off, gauge 5 off, the dent put at the wrong cell, a scorch invented
    _report("AB-1284", [("FAULT", False), ("PWR", False)], 45,
            [("crack", "top-left"), ("dent", "top-right"), ("scorch", "center")], "high", "replace component"),
    # a clean panel reported with corrosion, and its one lamp missing
    _report("CD-5678", [], 10, [("corrosion", "center")], "medium", "schedule repair"),
    None,  # no valid report
    copy.deepcopy(GOLD[3]),
    copy.deepcopy(GOLD[4]),
]


def test_scores_worked_out_by_hand():
    m = score_reports(GOLD, PRED)
    expected = {
        "schema_valid": (80.0, 5),  # 4 of 5
        "asset_code_exact": (60.0, 5),  # panels 2, 4, 5
        "asset_code_cer": (22.86, 5),  # (1/7 + 0 + 7/7 + 0 + 0) / 5
        "lamp_state_accuracy": (57.14, 7),  # FAULT, TEMP, COMM, PWR right of 7 gold lamps
        "gauge_mae": (21.0, 5),  # (5 + 0 + 100 + 0 + 0) / 5: no report is the whole scale wrong
        "severity_accuracy": (60.0, 5),
        "action_accuracy": (60.0, 5),
        "false_damage_rate_clean": (66.67, 3),  # clean panels 2 (corrosion), 3 (no report), 5 (right)
        # type only: gold crack, dent, missing_screw all found; predicted scorch and corrosion are false
        "damage.type.overall.recall": (100.0, 3),
        "damage.type.overall.precision": (60.0, 5),
        "damage.type.overall.f1": (75.0, 8),  # 2*3 / (2*3 + 2 + 0)
        "damage.type.dent.f1": (100.0, 2),
        "damage.type.scorch.precision": (0.0, 1),
        "damage.type.scorch.recall": (0.0, 0),  # no gold scorch: an empty denominator scores 0
        # type and location: the dent is at the wrong cell, so it is missed and false at once
        "damage.type_location.overall.recall": (66.67, 3),
        "damage.type_location.overall.precision": (40.0, 5),
        "damage.type_location.overall.f1": (50.0, 8),  # 2*2 / (2*2 + 3 + 1)
        "damage.type_location.dent.f1": (0.0, 2),
        "damage.type_location.crack.f1": (100.0, 2),
        "damage.type_location.missing_screw.recall": (100.0, 1),
    }
    for name, (value, n) in expected.items():
        assert (m[name]["value"], m[name]["n"]) == (value, n), name
    assert m["gauge_mae"]["unit"] == "gauge units" and m["schema_valid"]["unit"] == "%"
    for metric in m.values():
        low, high = metric["interval"]
        assert low <= metric["value"] + 1e-9 and metric["value"] <= high + 1e-9
    assert m["damage.type.crack.f1"]["interval"] == [100.0, 100.0]
    assert 0 < m["schema_valid"]["interval"][0] < 80 and m["schema_valid"]["interval"][1] == 100.0
    assert m == score_reports(GOLD, PRED)  # seeded intervals: the same numbers every run


def test_each_item_matches_at_most_once_and_types_can_be_listed():
    gold = [_report("AB-1234", [], 0, [("crack", "center"), ("crack", "top-left")], "high", "replace component")]
    pred = [_report("AB-1234", [], 0, [("crack", "center")] * 3, "high", "replace component")]
    m = score_reports(gold, pred, damage_types=["crack", "dent"])
    assert m["damage.type.crack.recall"]["value"] == 100.0 and m["damage.type.crack.precision"]["value"] == 66.67
    assert m["damage.type_location.crack.recall"]["value"] == 50.0
    assert m["damage.type_location.crack.precision"]["value"] == 33.33
    assert m["damage.type.dent.f1"] == {"value": 0.0, "interval": [0.0, 0.0], "n": 0, "unit": "%"}
    assert m["false_damage_rate_clean"]["n"] == 0
    with pytest.raises(ValueError, match="1 gold reports but 2 predictions"):
        score_reports(gold, pred * 2)


@pytest.fixture(scope="module")
def panels(tmp_path_factory):
    data = tmp_path_factory.mktemp("panels")
    write_dataset(data, n=3, seed=5, size=128)
    return data


def test_command_scores_a_synth_folder_and_writes_results(tiny_model, panels, tmp_path, capsys):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "model", processor)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, far faster on shared cores
    try:
        code = main(["--model", str(tmp_path / "model"), "--data", str(panels), "--limit", "2",
                     "--out", str(tmp_path / "out")])
        assert not (tmp_path / "model" / "results").exists()  # the model folder only when asked
        code = main(["--model", str(tmp_path / "model"), "--data", str(panels), "--limit", "2",
                     "--out", str(tmp_path / "out"), "--save-to-model"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    table = capsys.readouterr().out
    assert "| schema-valid reports (%) | 100.00 [100.00, 100.00] | 2 |" in table
    assert "| type + location: overall |" in table
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["n"] == 2 and result["failed"] == [] and result["schema"].startswith("urn:vlm:inspection-report:")
    assert {f"damage.type.{kind}.f1" for kind in ("crack", "corrosion", "scorch", "missing_screw", "dent")} \
        <= set(result["metrics"])
    reports = [json.loads(line) for line in (tmp_path / "out" / "reports.jsonl").read_text().splitlines()]
    gold = [json.loads(line) for line in (panels / "meta.jsonl").read_text().splitlines()][:2]
    assert [r["id"] for r in reports] == [g["id"] for g in gold]
    assert result["metrics"] == score_reports([g["report"] for g in gold], [r["report"] for r in reports],
                                              ("crack", "corrosion", "scorch", "missing_screw", "dent"))
    assert json.loads((tmp_path / "model" / "results" / "inspection.json").read_text()) == result


def test_bad_data_gets_one_line(panels, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.jsonl").write_text((panels / "meta.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    cases = {
        "meta.jsonl not found": ["--data", str(tmp_path)],
        "meta.jsonl line 2: not a panel record": ["--data", str(tmp_path / "bad")],
        "--limit must be at least 1": ["--data", str(panels), "--limit", "0"],
        "has no config.json": ["--data", str(panels)],
    }
    for expected, argv in cases.items():
        assert main(["--model", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
