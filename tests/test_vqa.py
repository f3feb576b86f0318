"""`python -m eval.vqa score` on small files in each official format; `run` end to end on a tiny model."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from eval import vqa
from eval.answering import generate_answers, with_suffix
from eval.benchmarks import BENCHMARKS, SHORT_ANSWER
from eval.formats import LAYOUTS, add_ocr, load_benchmark, read_ocr
from eval.vqa import main


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _cli(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def _score_args(benchmark: str, predictions: Path, questions=(), annotations=(), mode=None) -> list:
    args = ["score", "--benchmark", benchmark, "--predictions", predictions]
    args += ["--questions", *questions] if questions else []
    args += ["--annotations", *annotations] if annotations else []
    return args + (["--mode", mode] if mode else [])


def _score(capsys, *args, **kwargs) -> dict:
    code, result, _ = _cli(capsys, *_score_args(*args, **kwargs))
    assert code == 0
    return result


def _error(capsys, *argv) -> str:
    code, result, err = _cli(capsys, *argv)
    assert code == 2 and result is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.vqa: error: "), err
    return lines[0]


# ---- score, one official format at a time ------------------------------------------------------------


@pytest.fixture
def vqav2_files(tmp_path):
    questions = _write(tmp_path / "questions.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 1, "image_id": 42, "question": "Is it sunny?"},
        {"question_id": 2, "image_id": 42, "question": "How many dogs?"},
        {"question_id": 3, "image_id": 7, "question": "What colour?"}]})

    def ann(qid, answers, kind):
        return {"question_id": qid, "image_id": 42, "answer_type": kind, "question_type": "what",
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)]}

    annotations = _write(tmp_path / "annotations.json", {"annotations": [
        ann(1, ["yes"] * 10, "yes/no"), ann(2, ["2"] * 4 + ["3"] * 6, "number"),
        ann(3, ["red"] * 2 + ["blue"] * 8, "other")]})
    predictions = _write(tmp_path / "results.json", [{"question_id": 3, "answer": "red"},
                                                     {"question_id": 1, "answer": "Yes"},
                                                     {"question_id": 2, "answer": "two"}])
    return questions, annotations, predictions


def test_score_vqav2_modes_and_answer_types(capsys, vqav2_files):
    questions, annotations, predictions = vqav2_files
    llava = _score(capsys, "vqav2", predictions, [questions], [annotations])
    assert llava["mode"] == "llava" and llava["n"] == 3
    assert llava["value"] == 86.67  # "Yes" -> "yes" 1.0, "two" -> "2" 1.0, "red" 0.6
    official = _score(capsys, "vqav2", predictions, annotations=[annotations], mode="official")
    assert official["value"] == 53.33  # "Yes" against ten raw "yes" is 0
    assert official["per_category"]["answer_type"] == {
        "number": {"n": 1, "value": 100.0, "interval": [100.0, 100.0]},
        "other": {"n": 1, "value": 60.0, "interval": [60.0, 60.0]},
        "yes/no": {"n": 1, "value": 0.0, "interval": [0.0, 0.0]}}
    assert official["interval"][0] <= official["value"] <= official["interval"][1]


def test_score_llava_question_files_set_the_scope(capsys, tmp_path, vqav2_files):
    _, annotations, predictions = vqav2_files
    suffix = "\nAnswer the question using a single word or phrase."
    questions = _write_jsonl(tmp_path / "llava_vqav2.jsonl", [
        {"question_id": q, "image": "COCO_val2014_000000000042.jpg", "text": "Q?" + suffix,
         "category": "default"} for q in (1, 2)])
    result = _score(capsys, "vqav2", predictions, [questions], [annotations])
    # Question 3 is outside the question file: not scored, and its prediction is reported as unknown.
    assert result["n"] == 2 and result["value"] == 100.0 and result["unknown_ids"]["ids"] == ["3"]


def test_score_textvqa_m4c_counts_missing(capsys, tmp_path):
    data = _write(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 10, "question": "brand?", "image_id": "a1", "answers": ["Coca Cola"] * 10},
        {"question_id": 11, "question": "sign?", "image_id": "a2", "answers": ["stop"] * 3 + ["go"] * 7},
        {"question_id": 12, "question": "word?", "image_id": "a3", "answers": ["exit"] * 10}]})
    # A raw U+2028 inside a JSON string must not split the line; EvalAI's split() then treats it as a space.
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 10, "text": "coca\u2028cola", "model_id": "m"},
        {"question_id": 11, "text": "STOP.", "model_id": "m"}])
    code, result, err = _cli(capsys, *_score_args("textvqa", answers, annotations=[data]))
    assert code == 0 and result["mode"] == "m4c" and result["model"] == "m"
    assert result["value"] == 63.33  # (1.0 + 0.9 + 0) / 3
    assert result["missing"] == {"count": 1, "ids": ["12"]}
    assert "1 questions have no prediction" in err


def test_score_vizwiz_with_empty_prediction(capsys, tmp_path):
    def item(image, answers, kind):
        return {"image": image, "question": "what?", "answerable": 1, "answer_type": kind,
                "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}

    val = _write(tmp_path / "val.json", [
        item("VizWiz_val_0.jpg", ["unanswerable"] * 10, "unanswerable"),
        item("VizWiz_val_1.jpg", ["5 dollars"] * 3 + ["five dollars"] * 2 + ["5"] * 5, "other"),
        item("VizWiz_val_2.jpg", ["blue"] * 10, "other")])
    results = _write(tmp_path / "results.json", [{"image": "VizWiz_val_0.jpg", "answer": "Unanswerable"},
                                                 {"image": "VizWiz_val_1.jpg", "answer": "five dollars"},
                                                 {"image": "VizWiz_val_2.jpg", "answer": ""}])
    result = _score(capsys, "vizwiz", results, annotations=[val])
    # 1.0 (EvalAI lowercases), 1.0 ("five dollars" -> "5 dollars" matches five), 0 (empty): 66.67.
    assert result["value"] == 66.67 and result["empty"]["count"] == 1
    assert result["per_category"]["answer_type"]["other"]["value"] == 50.0


def test_score_gqa_balanced_only(capsys, tmp_path):
    questions = _write(tmp_path / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "isBalanced": True,
                "types": {"structural": "verify", "semantic": "attr"}},
        "202": {"imageId": "n2", "question": "Which side?", "answer": "left", "isBalanced": True,
                "types": {"structural": "query", "semantic": "rel"}},
        "203": {"imageId": "n3", "question": "Hm?", "answer": "no", "isBalanced": False, "types": {}}})
    predictions = _write(tmp_path / "testdev_balanced_predictions.json",
                         [{"questionId": "201", "prediction": "Yes."},
                          {"questionId": "202", "prediction": "left"}])
    llava = _score(capsys, "gqa", predictions, [questions])
    assert llava["value"] == 100.0 and llava["n"] == 2 and llava["skipped"] == {"unbalanced": 1}
    official = _score(capsys, "gqa", predictions, [questions], mode="official")
    assert official["value"] == 50.0
    assert official["per_category"]["answer_kind"]["binary"]["value"] == 0.0
    assert official["per_category"]["structural"]["query"]["value"] == 100.0


@pytest.fixture
def pope_files(tmp_path):
    # Like POPE's own files, every split numbers its questions from 1: pairing needs split and id.
    random = _write_jsonl(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}])
    popular = _write_jsonl(tmp_path / "coco_pope_popular.json", [
        {"question_id": 1, "image": "b.jpg", "text": "Is there a car?", "label": "yes"},
        {"question_id": 2, "image": "b.jpg", "text": "Is there a bus?", "label": "no"}])
    answers = [{"question_id": 2, "category": "popular", "text": "Yes, there is."},
               {"question_id": 1, "category": "random", "text": "Yes"},
               {"question_id": 2, "category": "random", "text": "No, there is not."},
               {"question_id": 1, "category": "popular", "text": "There is a car."}]
    return random, popular, answers


def test_score_pope_pairs_by_split_and_id(capsys, tmp_path, pope_files):
    random, popular, answers = pope_files
    forward = _score(capsys, "pope", _write_jsonl(tmp_path / "a.jsonl", answers), [random, popular])
    backward = _score(capsys, "pope", _write_jsonl(tmp_path / "b.jsonl", answers[::-1]), [random, popular])
    assert forward == {**backward, "settings": forward["settings"]}
    splits = forward["per_category"]["split"]
    assert splits["random"]["accuracy"] == 100.0 and splits["random"]["f1"] == 100.0
    # popular: yes/yes TP, "Yes, there is." for "no" FP -> precision 0.5, recall 1, F1 2/3 = "0.667".
    assert (splits["popular"]["tp"], splits["popular"]["fp"]) == (1, 1)
    assert splits["popular"]["f1"] == 66.7
    assert forward["value"] == 83.3  # mean F1 (1 + 2/3) / 2 = 0.8333 -> "0.833"


def test_score_pope_ambiguous_ids_are_an_error(capsys, tmp_path, pope_files):
    random, popular, answers = pope_files
    no_split = _write_jsonl(tmp_path / "answers.jsonl", [{k: v for k, v in a.items() if k != "category"}
                                                         for a in answers])
    assert "matches 2 questions" in _error(capsys, *_score_args("pope", no_split, [random, popular]))


def _problem(split, image, answer, n=3) -> dict:
    return {"question": "Which?", "choices": [f"c{i}" for i in range(n)], "answer": answer, "hint": "",
            "image": image, "split": split, "subject": "natural science"}


def test_score_scienceqa_img_subset(capsys, tmp_path):
    problems = _write(tmp_path / "problems.json", {
        "1": _problem("test", "image.png", 0), "2": _problem("test", "image.png", 2),
        "3": _problem("test", "image.png", 1, n=2), "4": _problem("test", None, 0),
        "5": _problem("train", "image.png", 0)})
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "1", "text": "A"}, {"question_id": "2", "text": "The answer is C."},
        {"question_id": "3", "text": "C"}, {"question_id": "4", "text": "A"}])
    result = _score(capsys, "scienceqa", answers, annotations=[problems])
    # Questions 1-3 have an image in the test split; "C" for a 2-choice question is wrong: 2 / 3.
    assert result["n"] == 3 and result["value"] == 66.67
    assert result["skipped"] == {"not_test_with_image": 2}
    assert result["unknown_ids"] == {"count": 1, "ids": ["4"]}


def test_score_scienceqa_from_llava_conversation_questions(capsys, tmp_path):
    problems = _write(tmp_path / "problems.json", {pid: _problem("test", image, 1, n=2)
                                                   for pid, image in (("7", "image.png"), ("8", "image.png"),
                                                                      ("9", None))})
    conversations = _write(tmp_path / "llava_test_CQM-A.json", [
        {"id": pid, **({"image": f"{pid}/image.png"} if pid != "9" else {}), "conversations": [
            {"from": "human",
             "value": ("<image>\n" if pid != "9" else "") + "Context: N/A\nWhich?\nA. c0\nB. c1"},
            {"from": "gpt", "value": "B"}]} for pid in ("7", "8", "9")])
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": "7", "text": "B"},
                                                      {"question_id": "8", "text": "B. c1"}])
    result = _score(capsys, "scienceqa", answers, [conversations], [problems])
    assert result["n"] == 2 and result["value"] == 100.0 and result["skipped"] == {"text_only": 1}


@pytest.fixture(scope="module")
def panels(tmp_path_factory) -> Path:
    from vlm.synth import write_dataset

    root = tmp_path_factory.mktemp("panels")
    write_dataset(root, 2, seed=0, size=56)
    return root


def test_score_panels_from_questions_jsonl(capsys, tmp_path, panels):
    questions = [json.loads(line) for line in (panels / "questions.jsonl").read_text().splitlines()]
    # Right answers (upper-cased, as a model might write them) for all but the two gauge questions.
    answers = _write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": q["question_id"], "text": q["answer"].upper() + "."} for q in questions
        if q["category"] != "gauge"])
    result = _score(capsys, "panels", answers, [panels / "questions.jsonl"])
    assert result["n"] == 14 and result["value"] == round(12 / 14 * 100, 2)
    assert result["per_category"]["category"]["gauge"]["value"] == 0.0
    assert result["missing"]["count"] == 2 and result["extra"]["asset_code_cer"]["value"] == 0.0
    assert result["extra"]["gauge_within_5"] == {"n": 2, "value": 0.0, "interval": [0.0, 0.0]}


# ---- bad files -----------------------------------------------------------------------------------------


def test_bad_files_give_one_line_errors(capsys, tmp_path, vqav2_files):
    questions, annotations, predictions = vqav2_files

    def error(predictions=predictions, benchmark="vqav2", **files) -> str:
        return _error(capsys, *_score_args(benchmark, predictions, **files))

    found = error(benchmark="gqa", annotations=[annotations])
    assert "VQAv2 annotations file; --benchmark gqa reads" in found
    broken = tmp_path / "broken.json"
    broken.write_text('[{"question_id": 1, "answer": "x"},\n]')  # the trailing comma LLaVA's docs show
    assert "line 2 column 1" in error(broken, annotations=[annotations])
    bad_line = tmp_path / "a.jsonl"
    bad_line.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": \n')
    assert "line 2" in error(bad_line, annotations=[annotations])
    strangers = _write(tmp_path / "strangers.json", [{"question_id": 99, "answer": "x"}])
    assert "none of the 1 prediction ids match" in error(strangers, annotations=[annotations])
    no_ids = _write(tmp_path / "no_ids.json", [{"answer": "x"}])
    assert "record 0 needs an id" in error(no_ids, annotations=[annotations])
    assert "holds no predictions" in error(_write(tmp_path / "empty.json", []), annotations=[annotations])
    # The mode is checked before any file is read.
    assert "--mode m4c does not apply to gqa" in error(benchmark="gqa", mode="m4c", annotations=[tmp_path])
    assert "invalid choice" in error(mode="nonsense", annotations=[annotations])
    assert "have no gold answer" in error(questions=[questions])
    assert "does not exist" in error(annotations=[tmp_path / "nope.json"])
    two = json.loads(annotations.read_text())["annotations"][:2]
    fewer = _write(tmp_path / "fewer.json", {"annotations": two})
    assert "1 of 3 questions have no annotation" in error(questions=[questions], annotations=[fewer])


def test_unknown_and_duplicate_prediction_ids_are_counted(capsys, tmp_path, vqav2_files):
    _, annotations, _ = vqav2_files
    predictions = _write(tmp_path / "results.json", [{"question_id": 1, "answer": "yes"},
                                                     {"question_id": 1, "answer": "no"},
                                                     {"question_id": 77, "answer": "x"}])
    code, result, err = _cli(capsys, *_score_args("vqav2", predictions, annotations=[annotations]))
    assert code == 0 and result["n"] == 3 and result["value"] == 33.33 and result["missing"]["count"] == 2
    assert result["unknown_ids"] == {"count": 1, "ids": ["77"]}
    assert result["duplicates"] == {"count": 1, "ids": ["1"]}
    assert "not a question" in err and "repeat an id" in err


# ---- run, end to end on a tiny random-weight model ---------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model) -> Path:
    model, processor = tiny_model
    out = tmp_path_factory.mktemp("tiny_vlm")
    model.save_pretrained(out, processor)
    return out


@pytest.fixture
def count_generation(monkeypatch) -> list[int]:
    """How many questions each call of generate_answers was given."""
    calls, real = [], vqa.generate_answers

    def counted(model, processor, questions, *args, **kwargs):
        calls.append(len(questions))
        return real(model, processor, questions, *args, **kwargs)

    monkeypatch.setattr(vqa, "generate_answers", counted)
    return calls


def test_run_panels_resumes_and_saves_results(capsys, tmp_path, panels, model_dir, count_generation):
    out = tmp_path / "out"
    args = ["run", "--model", model_dir, "--benchmark", "panels", "--questions", panels / "questions.jsonl",
            "--out", out, "--save-to-model", "--max-new-tokens", "3", "--batch-size", "4"]
    code, partial, _ = _cli(capsys, *args, "--limit", "5")
    assert code == 0 and partial["n"] == 5 and partial["settings"]["limit"] == 5
    code, result, _ = _cli(capsys, *args)
    assert code == 0 and count_generation == [5, 9]  # the second run answered only the 9 new questions
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 14 and len({a["question_id"] for a in answers}) == 14
    assert answers[0]["prompt"].count(SHORT_ANSWER) == 1  # the file's own suffix is not doubled
    assert result["n"] == 14 and result["missing"]["count"] == 0
    assert result["model"] == str(model_dir.resolve())
    assert result["settings"]["max_new_tokens"] == 3 and result["settings"]["batch_size"] == 4
    assert result["settings"]["prompt_suffix"] == SHORT_ANSWER
    assert set(result["per_category"]["category"]) == {"asset_code", "lamp", "gauge", "damage", "warning",
                                                        "severity", "action"}
    assert json.loads((out / "metrics.json").read_text()) == result
    assert json.loads((model_dir / "results" / "panels.json").read_text()) == result

    code, again, _ = _cli(capsys, *args)  # everything answered: no model load, no generation
    assert code == 0 and count_generation == [5, 9] and again == result

    # An interrupted write leaves a cut-off last line: it is dropped and that question answered again.
    path = out / "answers.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])
    code, _, err = _cli(capsys, *args)
    assert code == 0 and count_generation == [5, 9, 1] and "cut-off last line" in err
    assert len(path.read_text().splitlines()) == 14
    assert "another model or settings" in _error(capsys, *args[:-4], "--max-new-tokens", "5")

    # Retrained into the same folder, the model is another model: its old answers are not reused.
    weights = next(model_dir.rglob("*.safetensors"))
    before = weights.stat()
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    try:
        assert "before its files changed" in _error(capsys, *args)
    finally:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    code, _, _ = _cli(capsys, *args)
    assert code == 0 and count_generation == [5, 9, 1]  # results/ written by the runs does not count


def test_run_vqav2_without_then_with_annotations(capsys, tmp_path, panels, model_dir, vqav2_files,
                                                 count_generation):
    questions, annotations, _ = vqav2_files
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id in (42, 7):  # panel pictures under COCO's file names
        shutil.copy(panels / "images" / "panel_0_00000.png", images / f"COCO_val2014_{image_id:012d}.jpg")
    args = ["run", "--model", model_dir, "--benchmark", "vqav2", "--questions", questions, "--images", images,
            "--out", tmp_path / "out", "--max-new-tokens", "2"]
    code, result, err = _cli(capsys, *args)  # test-dev style: no gold, so answers and submission only
    assert code == 0 and result is None and "no metrics" in err
    assert not (tmp_path / "out" / "metrics.json").exists()
    upload = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert sorted(u["question_id"] for u in upload) == [1, 2, 3]
    assert all(isinstance(u["answer"], str) for u in upload)
    code, result, _ = _cli(capsys, *args, "--annotations", annotations)
    assert code == 0 and count_generation == [3]  # scored from the saved answers, nothing generated again
    assert result["n"] == 3 and result["mode"] == "llava"
    assert set(result["per_category"]["answer_type"]) == {"yes/no", "number", "other"}


def test_run_pope_splits_with_repeating_ids(capsys, tmp_path, panels, model_dir, pope_files,
                                            count_generation):
    random, popular, _ = pope_files
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(panels / "images" / "panel_0_00001.png", tmp_path / name)
    args = ["run", "--model", model_dir, "--benchmark", "pope", "--questions", random, popular,
            "--out", tmp_path / "out", "--max-new-tokens", "2"]
    code, result, _ = _cli(capsys, *args)
    assert code == 0 and result["n"] == 4 and result["metric"] == "f1"
    assert {k: v["n"] for k, v in result["per_category"]["split"].items()} == {"random": 2, "popular": 2}
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert sorted((a["category"], a["question_id"]) for a in answers) == [
        ("popular", 1), ("popular", 2), ("random", 1), ("random", 2)]
    assert _cli(capsys, *args)[1] == result and count_generation == [4]  # resumed by split and id


def test_run_input_errors(capsys, tmp_path, panels, model_dir):
    questions = panels / "questions.jsonl"
    base = ["run", "--benchmark", "panels", "--questions", questions, "--out", tmp_path / "o"]
    assert "not found" in _error(capsys, *base, "--model", tmp_path / "no_model")
    assert "are not in" in _error(capsys, *base, "--model", model_dir, "--images", tmp_path)
    found = _error(capsys, *base, "--model", model_dir, "--mode", "m4c")
    assert "--mode m4c does not apply to panels" in found
    assert "must be at least 1" in _error(capsys, *base, "--model", model_dir, "--batch-size", "0")
    assert "required" in _error(capsys, "run", "--benchmark", "panels")
    parsed = vqa.parse_args(["run", "--benchmark", "panels", "--questions", "q.jsonl", "--out", "o"])
    assert parsed.model == str(Path(vqa.__file__).resolve().parents[1] / "models" / "demo")


def test_suffix_is_not_doubled():
    assert with_suffix("Q?\n" + SHORT_ANSWER, SHORT_ANSWER) == "Q?\n" + SHORT_ANSWER
    assert with_suffix("Q?", BENCHMARKS["vizwiz"].prompt_suffix) == "Q?\n" + BENCHMARKS["vizwiz"].prompt_suffix



def test_every_benchmark_record_is_whole():
    assert list(BENCHMARKS) == ["vqav2", "textvqa", "vizwiz", "gqa", "pope", "scienceqa", "panels"]
    for name, record in BENCHMARKS.items():
        assert record.name == name and set(record.formats) <= set(LAYOUTS), name
        assert record.default_mode in record.modes and record.mode(None) == record.default_mode, name
    with pytest.raises(ValueError, match="does not apply to panels"):
        BENCHMARKS["panels"].mode("m4c")


def test_a_benchmark_added_to_the_table_is_scored_and_offered(capsys, monkeypatch, vqav2_files):
    """One record is all a benchmark needs: the command line offers it, its files are read and scored."""
    questions, annotations, predictions = vqav2_files
    monkeypatch.setitem(BENCHMARKS, "okvqa", dataclasses.replace(BENCHMARKS["vqav2"], name="okvqa",
                                                                 default_mode="official"))
    result = _score(capsys, "okvqa", predictions, [questions], [annotations])
    assert result["benchmark"] == "okvqa" and result["mode"] == "official"
    assert result == {**_score(capsys, "vqav2", predictions, [questions], [annotations], mode="official"),
                      "benchmark": "okvqa", "settings": {**result["settings"], "benchmark": "okvqa"}}
    gqa = _write(questions.parent / "gqa.json", {"1": {"imageId": "a", "question": "Q?", "answer": "x"}})
    expected = "--benchmark okvqa reads: VQAv2 questions, VQAv2 annotations, LLaVA eval JSONL"
    assert expected in _error(capsys, *_score_args("okvqa", predictions, annotations=[gqa]))


def test_each_command_takes_verbose():
    score_argv = ["score", "--benchmark", "vqav2", "--predictions", "p.json", "--annotations", "a.json"]
    assert vqa.parse_args([*score_argv, "--verbose"]).verbose and not vqa.parse_args(score_argv).verbose
    run_argv = ["run", "--benchmark", "panels", "--questions", "q.jsonl", "--out", "o"]
    assert vqa.parse_args([*run_argv, "--verbose"]).verbose

# ---- TextVQA: LLaVA's prompt, OCR tokens included, from the official files ---------------------------

# Three records of LLaVA's llava_textvqa_val_v051_ocr.jsonl as LLaVA ships it (the id is the image's).
LLAVA_TEXTVQA = [
    {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "category": "default",
     "text": "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera, Pire, "
             "digitat\nAnswer the question using a single word or phrase."},
    {"question_id": "b9dc400eb20bad64", "image": "b9dc400eb20bad64.jpg", "category": "default",
     "text": "What does the small white text spell?\nReference OCR token: D, RUPALCON, PALCON, COPENHAGEN\n"
             "Answer the question using a single word or phrase."},
    {"question_id": "0a0b0c0d0e0f0a0b", "image": "0a0b0c0d0e0f0a0b.jpg", "category": "default",
     "text": "What colour is the sky?\nAnswer the question using a single word or phrase."},  # no OCR tokens
    {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "category": "default",
     "text": "What kind of camera is this?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera, Pire, "
             "digitat\nAnswer the question using a single word or phrase."},  # the same image, so the same id
]


@pytest.fixture
def textvqa_files(tmp_path, panels):
    """TextVQA_0.5.1_val.json and TextVQA_Rosetta_OCR_v0.2_val.json shaped like the official files."""
    def question(qid, image_id, text):
        return {"question": text, "image_id": image_id, "image_classes": ["Camera"], "flickr_original_url": "",
                "flickr_300k_url": "", "image_width": 1024, "image_height": 664, "answers": ["dakota"] * 10,
                "question_tokens": text.rstrip("?").split(), "question_id": qid, "set_name": "val"}

    def ocr(image_id, tokens):
        return {"image_id": image_id, "ocr_tokens": tokens, "ocr_info": [
            {"word": t, "bounding_box": {"top_left_x": 0.1, "top_left_y": 0.2, "width": 0.1, "height": 0.05,
                                         "rotation": 0, "roll": 0, "pitch": 0, "yaw": 0}} for t in tokens]}

    questions = _write(tmp_path / "TextVQA_0.5.1_val.json", {
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": 0.5, "data": [
            question(34602, "003a8ae2ef43b901", "what is the brand of this camera?"),
            question(34603, "b9dc400eb20bad64", "what does the small white text spell?"),
            question(34604, "0a0b0c0d0e0f0a0b", "what colour is the sky?"),
            question(34605, "003a8ae2ef43b901", "what kind of camera is this?")]})
    tokens = _write(tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json", {
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": 0.2, "data": [
            ocr("003a8ae2ef43b901", ["DAKOTA", "DIGITAL", "Single-Use", "Camera", "Pire", "digitat"]),
            ocr("b9dc400eb20bad64", ["D", "RUPALCON", "PALCON", "COPENHAGEN"]), ocr("0a0b0c0d0e0f0a0b", [])]})
    llava = _write_jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", LLAVA_TEXTVQA)
    for record in LLAVA_TEXTVQA:
        shutil.copy(panels / "images" / "panel_0_00000.png", tmp_path / record["image"])
    return questions, tokens, llava


def test_textvqa_official_files_give_llavas_prompt_text(textvqa_files):
    questions, tokens, llava = textvqa_files
    official, _ = load_benchmark(BENCHMARKS["textvqa"], [questions])
    add_ocr(official, tokens)
    assert [with_suffix(q.text, SHORT_ANSWER) for q in official] == [r["text"] for r in LLAVA_TEXTVQA]
    theirs, _ = load_benchmark(BENCHMARKS["textvqa"], [llava])  # LLaVA's own file is asked exactly as it is
    add_ocr(theirs, None)
    assert [with_suffix(q.text, SHORT_ANSWER) for q in theirs] == [r["text"] for r in LLAVA_TEXTVQA]
    # lmms-eval's copy of the questions carries the tokens in each record: the same text without --ocr.
    data, table = json.loads(questions.read_text()), read_ocr(tokens)
    for record in data["data"]:
        record["ocr_tokens"] = table[record["image_id"]]
    inline, _ = load_benchmark(BENCHMARKS["textvqa"], [_write(questions.parent / "inline.json", data)])
    add_ocr(inline, None)
    assert [q.text for q in inline] == [q.text for q in official]


def test_run_textvqa_asks_with_ocr_tokens_and_refuses_other_prompts(capsys, tmp_path, model_dir, textvqa_files,
                                                                     count_generation):
    questions, tokens, _ = textvqa_files
    base = ["run", "--model", model_dir, "--benchmark", "textvqa", "--questions", questions,
            "--out", tmp_path / "out", "--max-new-tokens", "1"]
    assert "pass --ocr TextVQA_Rosetta_OCR_v0.2_val.json" in _error(capsys, *base)
    code, result, _ = _cli(capsys, *base, "--ocr", tokens)
    assert code == 0 and result["n"] == 4 and result["settings"]["ocr"] == str(tokens)
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["prompt"] for a in answers) == sorted(r["text"] for r in LLAVA_TEXTVQA)
    # Answers asked with the OCR tokens are not reused for prompts without them.
    assert "was asked another prompt" in _error(capsys, *base, "--no-ocr")
    assert count_generation == [4]
    few = _write(tmp_path / "few_ocr.json", {"data": json.loads(tokens.read_text())["data"][:1]})
    assert "2 images of the questions have no record in" in _error(capsys, *base, "--ocr", few)
    assert "not a TextVQA OCR file" in _error(capsys, *base, "--ocr", questions.parent / "llava_textvqa_val_v051_ocr.jsonl")


def test_llavas_textvqa_file_runs_and_scores_against_the_official_file(capsys, tmp_path, model_dir,
                                                                       textvqa_files, count_generation):
    questions, _, llava = textvqa_files
    args = ["run", "--model", model_dir, "--benchmark", "textvqa", "--questions", llava, "--annotations", questions,
            "--out", tmp_path / "out", "--max-new-tokens", "1"]
    code, result, _ = _cli(capsys, *args)
    assert code == 0 and result["n"] == 4 and result["missing"]["count"] == 0
    assert _cli(capsys, *args)[1] == result and count_generation == [4]  # resumed: ids repeat, prompts differ
    # LLaVA's own answers file names each answer by its image id and carries its prompt, as LLaVA pairs them.
    answers = _write_jsonl(tmp_path / "llava-answers.jsonl", [
        {"question_id": r["question_id"], "prompt": r["text"], "text": "Dakota" if i == 0 else "pire"}
        for i, r in enumerate(LLAVA_TEXTVQA)])
    scored = _score(capsys, "textvqa", answers, [llava], [questions])
    assert scored["n"] == 4 and scored["value"] == 25.0 and scored["missing"]["count"] == 0


# ---- what a run writes, and where ---------------------------------------------------------------------


def test_run_writes_under_out_only_unless_asked(capsys, tmp_path, panels, model_dir):
    results = model_dir / "results" / "panels.json"
    results.unlink(missing_ok=True)
    args = ["run", "--model", model_dir, "--benchmark", "panels", "--questions", panels / "questions.jsonl",
            "--out", tmp_path / "out", "--max-new-tokens", "1", "--limit", "2"]
    code, result, _ = _cli(capsys, *args)
    assert code == 0 and not results.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["answers.jsonl", "metrics.json"]
    code, again, _ = _cli(capsys, *args, "--save-to-model")
    assert code == 0 and json.loads(results.read_text()) == again == result
    assert "needs a local model folder" in _error(capsys, *args[:2], "some-org/some-model", *args[3:],
                                                  "--save-to-model")


def _broken_copies(model_dir: Path, root: Path) -> dict[str, Path]:
    """A saved model with its projector cut in half, and one whose LM weights file is empty."""
    cut, empty = root / "cut", root / "empty"
    for copy in (cut, empty):
        shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("results"))
    projector = cut / "projector.safetensors"
    projector.write_bytes(projector.read_bytes()[: projector.stat().st_size // 2])
    (empty / "language_model" / "model.safetensors").write_bytes(b"")
    return {"projector.safetensors": cut, "model.safetensors": empty}


def test_run_with_corrupt_weights_names_the_file(capsys, tmp_path, panels, model_dir):
    for name, broken in _broken_copies(model_dir, tmp_path).items():
        line = _error(capsys, "run", "--model", broken, "--benchmark", "panels", "--questions",
                      panels / "questions.jsonl", "--out", tmp_path / f"out-{name}", "--limit", "1")
        assert "cannot load model" in line and name in line, line


def test_bad_paths_and_encodings_get_one_line(capsys, tmp_path, panels, model_dir, textvqa_files):
    questions = panels / "questions.jsonl"
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"question_id": 1, "image": "a.jpg", "text": "caf\u00e9?"}\n'.encode("latin-1"))
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    base = ["run", "--model", model_dir, "--benchmark", "panels"]
    cases = {
        f"{panels} is a folder, not a file": [*base, "--questions", panels, "--out", tmp_path / "o"],
        f"{latin} is not UTF-8 text": [*base, "--questions", latin, "--out", tmp_path / "o"],
        f"--images {a_file} is a file, not a folder": [*base, "--questions", questions, "--images", a_file,
                                                        "--out", tmp_path / "o"],
        f"--out {a_file} is a file, not a folder": [*base, "--questions", questions, "--out", a_file],
        f"--model {a_file} is a file, not a model folder": ["run", "--model", a_file, "--benchmark", "panels",
                                                             "--questions", questions, "--out", tmp_path / "o"],
        f"{tmp_path} is a folder, not a file": ["run", "--model", model_dir, "--benchmark", "textvqa",
                                                "--questions", textvqa_files[0], "--ocr", tmp_path,
                                                "--out", tmp_path / "o"],
        f"{latin} is not UTF-8": _score_args("panels", latin, [questions]),
    }
    for expected, argv in cases.items():
        assert expected in _error(capsys, *argv)
    assert not (tmp_path / "o").exists()


# ---- one BOS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vicuna_model(tmp_path_factory, parts):
    """A tiny model with a Vicuna-style tokenizer (adds BOS itself) and LLaVA-1.5's vicuna_v1 template."""
    from vlm import ModelConfig, build_vlm
    from vlm.testing import tiny_lm

    lm = tiny_lm(tmp_path_factory.mktemp("vicuna"), "llama", tokenizer="sentencepiece")
    return build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(lm), chat_template="vicuna_v1"))


def test_vicuna_prompts_carry_one_bos(vicuna_model, panels, monkeypatch):
    model, processor = vicuna_model
    prompts, real = [], model.generate_shared

    def capture(**inputs):
        prompts.append((inputs["input_ids"], inputs["attention_mask"]))
        return real(**inputs)

    monkeypatch.setattr(model, "generate_shared", capture)
    questions, _ = load_benchmark(BENCHMARKS["panels"], [panels / "questions.jsonl"])
    generate_answers(model, processor, questions[:3], panels, SHORT_ANSWER, 3, 1, lambda *a: None)
    ids, mask = prompts[0]
    bos = processor.tokenizer.bos_token_id
    assert ids.shape[0] == 3 and bos is not None
    assert [int(((row == bos) & (keep == 1)).sum()) for row, keep in zip(ids, mask, strict=True)] == [1, 1, 1]
