"""vlm.report: the schema is make_report's, constrained reports always validate, batch and chat.py --report."""

import csv
import json
import random
import shutil
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import jsonschema
import pytest
import torch
from PIL import Image

import vlm.report.__main__ as batch
from vlm.model import VLM
from vlm.report import (
    REPORT_SCHEMA,
    GrammarLogitsProcessor,
    ReportError,
    ReportGenerator,
    compile_report_grammar,
    longest_report,
    longest_report_chars,
)
from vlm.synth.panels import REPORT_FIELDS, make_report, sample_truth

ROOT = Path(__file__).resolve().parents[1]
# An implementation independent of the one that constrains decoding checks every report.
VALIDATOR = jsonschema.Draft202012Validator(REPORT_SCHEMA)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run faster on one thread, and many times faster when other jobs share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator(tiny_model):
    return ReportGenerator(*tiny_model)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_model):
    model, processor = tiny_model
    folder = tmp_path_factory.mktemp("report") / "model"
    model.save_pretrained(folder, processor)
    return folder


def _picture(i: int) -> Image.Image:
    return Image.new("RGB", (60 + 3 * i, 48), (13 * i % 256, 200 - 9 * i, 90))


def test_schema_is_draft_2020_12_and_describes_exactly_what_make_report_writes(generator):
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    assert REPORT_SCHEMA["$id"].endswith(REPORT_SCHEMA["version"])
    assert list(REPORT_SCHEMA["properties"]) == list(REPORT_FIELDS)
    for seed in range(300):
        report = make_report(sample_truth(random.Random(seed)))
        VALIDATOR.validate(report)
        # The constraint accepts the stage-2 answer text itself: same keys, order and separators.
        assert generator.parse(json.dumps(report)) == report


def test_every_bound_is_enforced_by_the_schema_and_by_the_grammar(generator):
    longest = {**longest_report(), "asset_code": "KX-4821", "notes": "n" * 200}  # real strings, same lengths
    VALIDATOR.validate(longest)
    assert generator.parse(json.dumps(longest)) == longest
    assert len(json.dumps(longest)) == longest_report_chars() == generator.max_new_tokens - 1
    base = make_report(sample_truth(random.Random(1)))
    crack = {"type": "crack", "location": "center", "severity": "high"}
    for change in ({"notes": "x" * 201}, {"notes": 'say "hi"'}, {"lamps": longest["lamps"] * 2},
                   {"damage": [crack] * 10}, {"damage": [{**crack, "type": "rust"}]}, {"gauge_reading": 101},
                   {"gauge_reading": -1}, {"asset_code": "IO-1234"}, {"asset_code": "AB-12345"},
                   {"overall_severity": "severe"}, {"recommended_action": "panic"}, {"warning_label": "yes"}):
        bad = {**base, **change}
        assert not VALIDATOR.is_valid(bad), change
        with pytest.raises(ReportError):
            generator.parse(json.dumps(bad))
    with pytest.raises(ReportError, match="incomplete"):
        generator.parse(json.dumps(base)[:-1])
    with pytest.raises(ReportError):  # another layout is not what the constraint writes
        generator.parse(json.dumps(base, indent=2))


def test_the_mask_follows_each_row_and_leaves_a_finished_row_alone(generator):
    tokenizer, stop = generator.tokenizer, generator.stop_ids[0]
    pad = generator.processor.tokenizer.pad_token_id
    short, long = (tokenizer.tokenize_str(json.dumps(make_report(sample_truth(random.Random(seed)))))
                   for seed in (1, 2))
    short, long = sorted((short, long), key=len)
    assert len(short) < len(long)
    # generate's rows: a report, its stop token, then padding once the row is finished
    rows = [short + [stop] + [pad] * (len(long) - len(short)), long + [stop]]
    processor, vocab = GrammarLogitsProcessor(tokenizer, generator.grammar), tokenizer.vocab_size
    ids = torch.zeros((2, 3), dtype=torch.long)  # the prompt
    for step in range(len(rows[1])):
        scores = processor(ids, torch.zeros(2, vocab))
        for row, tokens in enumerate(rows):
            allowed = scores[row].isfinite().nonzero().flatten().tolist()
            if stop in tokens[:step]:
                assert torch.equal(scores[row], torch.zeros(vocab))  # finished: generate pads it, scores untouched
            elif tokens[step] == stop:
                assert allowed == sorted(generator.stop_ids)  # a complete report: only a stop token may follow
            else:
                assert tokens[step] in allowed and len(allowed) < vocab
        ids = torch.cat([ids, torch.tensor([[rows[0][step]], [rows[1][step]]])], dim=1)
    wrong = GrammarLogitsProcessor(tokenizer, generator.grammar)
    wrong(ids[:1, :3], torch.zeros(1, vocab))
    with pytest.raises(ReportError, match="rejected token"):  # a token the mask forbade
        wrong(torch.tensor([[0, 0, 0, tokenizer.tokenize_str("]")[0]]]), torch.zeros(1, vocab))


def test_a_schema_keyword_the_grammar_cannot_enforce_is_an_error_not_ignored(generator):
    schema = deepcopy(REPORT_SCHEMA)
    schema["properties"]["lamps"]["uniqueItems"] = True
    with pytest.raises(ValueError, match="uniqueItems"):
        compile_report_grammar(generator.tokenizer, schema)


def test_twenty_reports_from_a_random_model_are_all_schema_valid(tiny_model, generator):
    model, processor = tiny_model
    prompt = processor(images=[_picture(0)], text=[generator.prompt])
    free = model.generate(**prompt, max_new_tokens=40, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with pytest.raises(json.JSONDecodeError):  # unconstrained, the random model writes no JSON at all
        json.loads(processor.decode(free[0, prompt["input_ids"].shape[1]:]))
    torch.manual_seed(0)
    sampled = ReportGenerator(model, processor, temperature=1.0)  # sampling walks many shapes, not one path
    texts = sampled.generate_texts([_picture(i) for i in range(10)]) + sampled.generate_texts(
        [_picture(i) for i in range(10, 18)]) + generator.generate_texts([_picture(18), _picture(19)])
    reports = [json.loads(text) for text in texts]
    assert len(reports) == 20
    for report in reports:
        VALIDATOR.validate(report)
        assert list(report) == list(REPORT_FIELDS)
    assert len(set(texts)) > 10
    assert any(report["damage"] for report in reports) and any(report["lamps"] for report in reports)


def test_batch_records_a_corrupt_image_and_a_rerun_does_no_work_twice(saved_model, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    out = images / "reports"  # inside the input folder: its thumbnails must not become inputs
    (images / "site2").mkdir(parents=True)
    for i in range(3):
        _picture(i).save(images / f"p{i}.png")
    _picture(3).save(images / "site2" / "p3.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a picture")
    (images / "notes.txt").write_text("not an image")
    generated = []
    original = VLM.generate

    def counting(self, *args, **kwargs):
        generated.append(kwargs["pixel_values"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VLM, "generate", counting)
    argv = [str(images), "--out", str(out), "--model", str(saved_model), "--batch-size", "2"]
    assert batch.main(argv) == 0
    assert "done 4, skipped 0, failed 1, ignored 1 files" in capsys.readouterr().out
    assert sum(generated) == 4
    records = {r["image"]: r for r in map(json.loads, (out / "reports.jsonl").read_text().splitlines())}
    assert sorted(records) == ["broken.png", "p0.png", "p1.png", "p2.png", "site2/p3.jpg"]
    assert records["broken.png"]["report"] is None and "broken.png cannot be read" in records["broken.png"]["error"]
    for name in ("p0.png", "p1.png", "p2.png", "site2/p3.jpg"):
        VALIDATOR.validate(records[name]["report"])
        assert (out / records[name]["thumbnail"]).is_file()
    rows = list(csv.DictReader((out / "reports.csv").open()))
    assert [row["image"] for row in rows] == sorted(records)
    assert rows[0]["status"] == "failed" and rows[1]["asset_code"] == records["p0.png"]["report"]["asset_code"]
    page = (out / "index.html").read_text()
    assert page.count("<img ") == 4 and "broken.png cannot be read" in page

    log = (out / "reports.jsonl").read_bytes()
    generated.clear()
    assert batch.main(argv) == 0  # the reports are kept; the failed image is tried again
    assert "done 0, skipped 4, failed 1" in capsys.readouterr().out
    assert generated == [] and (out / "reports.jsonl").read_bytes().startswith(log)

    _picture(9).save(images / "broken.png")  # a repaired file has new content, so it is redone alone
    assert batch.main(argv) == 0
    assert "done 1, skipped 4, failed 0" in capsys.readouterr().out
    assert generated == [1]
    assert batch.read_records(out / "reports.jsonl")["broken.png"]["error"] is None


def test_a_failed_image_is_retried_and_a_cut_off_record_repaired(saved_model, tmp_path, monkeypatch, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i in range(3):
        _picture(i).save(images / f"p{i}.png")
    generated, original = [], VLM.generate

    def flaky(self, *args, **kwargs):  # the first batch fails (as an out-of-memory error would)
        generated.append(kwargs["pixel_values"].shape[0])
        if len(generated) == 1:
            raise RuntimeError("out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VLM, "generate", flaky)
    argv = [str(images), "--out", str(out), "--model", str(saved_model), "--batch-size", "2"]
    assert batch.main(argv) == 0
    assert "done 1, skipped 0, failed 2" in capsys.readouterr().out
    assert batch.main(argv) == 0  # the two failed images are tried again, the report is kept
    assert "done 2, skipped 1, failed 0" in capsys.readouterr().out and generated == [2, 1, 2]
    records = batch.read_records(out / "reports.jsonl")
    assert all(r["error"] is None for r in records.values()) and len(records) == 3

    # A crash while writing leaves half a record: it is cut before the rerun appends, and its image redone.
    log = out / "reports.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-1]) + lines[-1][:30])
    assert batch.main(argv) == 0
    captured = capsys.readouterr()
    assert "cut-off last line" in captured.err and "done 1, skipped 2, failed 0" in captured.out
    assert all(json.loads(line) for line in log.read_text().splitlines())
    assert sorted(batch.read_records(log)) == ["p0.png", "p1.png", "p2.png"]


def test_outputs_are_replaced_whole(saved_model, tmp_path, monkeypatch, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    _picture(0).save(images / "p0.png")
    argv = [str(images), "--out", str(out), "--model", str(saved_model)]
    assert batch.main(argv) == 0
    table, page = (out / "reports.csv").read_bytes(), (out / "index.html").read_bytes()
    inodes = {name: (out / name).stat().st_ino for name in ("reports.csv", "index.html")}
    (images / "notes.png").write_bytes(b"not a picture")

    def failing_row(record):  # a crash while the table is written
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_row", failing_row)
    with pytest.raises(KeyboardInterrupt):
        batch.main(argv)
    assert (out / "reports.csv").read_bytes() == table and (out / "index.html").read_bytes() == page
    monkeypatch.undo()
    assert batch.main(argv) == 0
    # Each file is a new one renamed over the old (a reader never sees half of it); no temporary is left.
    assert all((out / name).stat().st_ino != inode for name, inode in inodes.items())
    assert "notes.png" in (out / "reports.csv").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "reports.csv", "reports.jsonl", "thumbs"]
    capsys.readouterr()


def _broken_copies(model_dir: Path, root: Path) -> dict[str, Path]:
    """A saved model with its projector cut in half, and one whose LM weights file is empty."""
    cut, empty = root / "cut", root / "empty"
    for copy in (cut, empty):
        shutil.copytree(model_dir, copy)
    projector = cut / "projector.safetensors"
    projector.write_bytes(projector.read_bytes()[: projector.stat().st_size // 2])
    (empty / "language_model" / "model.safetensors").write_bytes(b"")
    return {"projector.safetensors": cut, "model.safetensors": empty}


def test_corrupt_weights_and_bad_paths_get_one_line(saved_model, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    _picture(0).save(tmp_path / "images" / "p.png")
    a_file = tmp_path / "images" / "p.png"
    cases = {f"{name} ": [str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--model", str(broken)]
             for name, broken in _broken_copies(saved_model, tmp_path / "broken").items()}
    cases[f"--model {a_file} is a file, not a model folder"] = [str(tmp_path / "images"), "--out",
                                                                 str(tmp_path / "out"), "--model", str(a_file)]
    cases[f"{a_file} is not a folder (a file"] = [str(a_file), "--out", str(tmp_path / "out"), "--model",
                                                   str(saved_model)]
    for expected, argv in cases.items():
        assert batch.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    # A line of reports.jsonl that is not UTF-8 only redoes its image.
    out = tmp_path / "out"
    (out / "reports.jsonl").write_bytes(b'{"image": "caf\xe9.png"}\n')
    assert batch.main([str(tmp_path / "images"), "--out", str(out), "--model", str(saved_model)]) == 0
    captured = capsys.readouterr()
    assert "line 1 is not a report record" in captured.err and "done 1" in captured.out


@pytest.fixture(scope="module")
def vicuna_model(tmp_path_factory, parts):
    """A tiny model with a Vicuna-style tokenizer (adds BOS itself) and LLaVA-1.5's vicuna_v1 template."""
    from vlm import ModelConfig, build_vlm
    from vlm.testing import tiny_lm

    lm = tiny_lm(tmp_path_factory.mktemp("vicuna"), "llama", tokenizer="sentencepiece")
    return build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(lm), chat_template="vicuna_v1"))


def test_vicuna_report_prompt_carries_one_bos(vicuna_model, monkeypatch):
    model, processor = vicuna_model
    prompts, real = [], model.generate

    def capture(**inputs):
        prompts.append(inputs["input_ids"])
        return real(**inputs)

    monkeypatch.setattr(model, "generate", capture)
    ReportGenerator(model, processor, max_new_tokens=2).generate_texts([_picture(0), _picture(1)])
    bos = processor.tokenizer.bos_token_id
    assert bos is not None and [int((row == bos).sum()) for row in prompts[0]] == [1, 1]


def test_html_lists_flagged_reports_first_most_severe_first(tmp_path):
    base = make_report(sample_truth(random.Random(2)))

    def record(name: str, severity: str | None, damage: list | None = None) -> dict:
        report = None if severity is None else {**base, "overall_severity": severity, "damage": damage or []}
        return {"image": name, "report": report, "error": None if report else "cannot be read",
                "flagged": None if report is None else batch.is_flagged(report), "thumbnail": None}

    dent = [{"type": "dent", "location": "center", "severity": "medium"}]
    records = [record("a-clean.png", "none"), record("b-failed.png", None), record("c-low.png", "low"),
               record("d-critical.png", "critical"), record("e-damage-only.png", "none", dent),
               record("<f>.png", "none")]
    batch.write_html(records, tmp_path / "index.html")
    page = (tmp_path / "index.html").read_text()
    order = ["d-critical.png", "c-low.png", "e-damage-only.png", "b-failed.png", "&lt;f&gt;.png", "a-clean.png"]
    positions = [page.index(f"<h3>{name}</h3>") for name in order]
    assert positions == sorted(positions)
    assert "<f>" not in page and "6 images: 3 flagged, 1 failed, 2 clean" in page


def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "images").mkdir()
    _picture(0).save(tmp_path / "images" / "p.png")
    monkeypatch.setattr(batch, "DEFAULT_MODEL", tmp_path / "models" / "demo")
    cases = {
        "no model at": [str(tmp_path / "images"), "--out", str(tmp_path / "out")],
        "is not a folder": [str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
        "has no config.json": [str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--model", str(tmp_path)],
        "give IMAGES_DIR": [],
        "unrecognized arguments": [str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--fast"],
    }
    for expected, argv in cases.items():
        assert batch.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert batch.main(["--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == REPORT_SCHEMA


def _chat(*args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # A module set to None in sys.modules cannot be imported: the run is that of an install without it.
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({list(blocked)!r})); "
            f"sys.argv[0] = {str(ROOT / 'chat.py')!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_chat_report_prints_one_schema_valid_report_without_triton(saved_model, tmp_path):
    # Bad images and models fail before --report is looked at: tests/test_chat.py covers those lines.
    _picture(5).save(tmp_path / "panel.jpg")
    result = _chat("--image", str(tmp_path / "panel.jpg"), "--model", str(saved_model), "--report",
                   blocked=("triton", "xgrammar"))  # a CPU install has neither
    assert result.returncode == 0, result.stderr
    VALIDATOR.validate(json.loads(result.stdout))
    assert result.stdout.startswith("{\n  \"asset_code\": ")  # pretty-printed, nothing before it
