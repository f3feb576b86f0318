"""The docs: generated numbers match the results files, the README stays short and its commands parse."""

import importlib.util
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from vlm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools" / "render_docs.py")
render_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_docs)

RESULTS = ["models/demo/results/panels.json", "models/demo/results/inspection.json",
           "models/demo/results/recipe.json", "benchmarks/results.json", "benchmarks/data_results.json",
           "benchmarks/decoding_results.json"]


def copy_tree(tmp_path: Path) -> Path:
    """The docs and results files in a scratch root, to change them freely."""
    for rel in ["README.md", "benchmarks/README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
                *RESULTS]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


@pytest.mark.parametrize("doc", render_docs.doc_files(), ids=lambda p: p.name)
def test_generated_regions_match_the_results_files(doc):
    text = doc.read_text()
    rendered = render_docs.render(text, doc.name)
    stale = [a.group(1) for a, b in zip(render_docs.REGION.finditer(text), render_docs.REGION.finditer(rendered),
                                        strict=True) if a.group(0) != b.group(0)]
    assert not stale, f"{doc.name}: regions {stale} differ from the results files: run python tools/render_docs.py"


def test_every_results_file_feeds_a_region():
    names = set()
    for doc in render_docs.doc_files():
        names |= {match.group(1) for match in render_docs.REGION.finditer(doc.read_text())}
    assert names == set(render_docs.RENDERERS), "a renderer is used by no doc, or a doc names an unknown one"


def test_a_changed_result_changes_the_docs_and_check_fails(tmp_path, capsys):
    root = copy_tree(tmp_path)
    assert render_docs.main(["--check"], root=root) == 0
    panels = json.loads((root / RESULTS[0]).read_text())
    panels["per_category"]["category"]["lamp"]["value"] = 12.34
    (root / RESULTS[0]).write_text(json.dumps(panels))
    bench = json.loads((root / RESULTS[3]).read_text())
    bench["rows"][0]["ratio"]["median"] = 7.654
    (root / RESULTS[3]).write_text(json.dumps(bench))
    assert render_docs.main(["--check"], root=root) == 1
    assert "out of date: README.md, docs/demo-model.md" in capsys.readouterr().out
    assert render_docs.main([], root=root) == 0
    assert "| lamp state | 12.34 [" in (root / "docs/demo-model.md").read_text()
    assert "| 7.654 [" in (root / "README.md").read_text()
    assert render_docs.main(["--check"], root=root) == 0


def test_the_data_benchmark_table_follows_its_results_and_projects_to_665k(tmp_path, capsys):
    root = copy_tree(tmp_path)
    assert "benchmarks/README.md" in [str(p.relative_to(ROOT)) for p in render_docs.doc_files()]
    assert render_docs.main(["--check"], root=root) == 0
    results = json.loads((root / RESULTS[4]).read_text())
    results["settings"]["records"] = 100_000  # projections scale by 6.65
    results["runs"].update(uncached_cpu_s=120.0, cached_first_step_s=10.0, resume_next_step_s=4.0)
    results["preflight"][0]["cpu_ms_per_record"] = 1.2
    results["loader"][1]["samples_per_s"] = 123.4
    results["memory"][-1]["peak_mb"] = 2100.0
    (root / RESULTS[4]).write_text(json.dumps(results))
    assert render_docs.main(["--check"], root=root) == 1
    assert "out of date: benchmarks/README.md" in capsys.readouterr().out
    assert render_docs.main([], root=root) == 0
    table = (root / "benchmarks/README.md").read_text()
    assert "1.20 CPU-ms a record (665K: 13.3 CPU-min)" in table
    assert "| first step, 100K records, preflight not cached | " in table
    assert "2.0 CPU-min (665K, linear: ~13.3 CPU-min) | <= 15 CPU-min at 665K | pass |" in table
    assert "| 10.0 s (665K, linear: ~66 s) | <= 60 s | **miss** |" in table
    assert "| 4.0 s (665K, linear: ~27 s) | <= 60 s | pass |" in table
    assert " / 123 / " in table and "(1M: 2100 MB in all) | <= 2 GB at 1M | **miss** |" in table
    assert render_docs.main(["--check"], root=root) == 0


def test_the_decoding_doc_follows_its_results(tmp_path, capsys):
    root = copy_tree(tmp_path)
    assert render_docs.main(["--check"], root=root) == 0
    results = json.loads((root / RESULTS[5]).read_text())
    candidates = {c["name"]: c for c in results["candidates"]}
    candidates["xgrammar"]["size"].update(mb=2000.0, added=[["triton", "9.9", 1900.0], ["xgrammar", "0.2.9", 100.0]])
    gauge_101 = [case["label"] for case in results["edge_cases"]].index("gauge 101")
    candidates["llguidance"]["probe"]["edge_accepted"][gauge_101] = True
    candidates["llguidance"]["probe"]["layouts_accepted"]["compact"] = 3
    results["speed"]["llguidance"][-1]["per_token_ms"] = 4.321
    (root / RESULTS[5]).write_text(json.dumps(results))
    assert render_docs.main(["--check"], root=root) == 1
    assert "out of date: docs/constrained-decoding.md" in capsys.readouterr().out
    assert render_docs.main([], root=root) == 0
    doc = (root / "docs/constrained-decoding.md").read_text()
    assert "| llguidance 1.9.1 | 7.9 | none | 18/19 right; accepts gauge 101 | also compact |" in doc
    assert "| 2,000 | triton 1,900 |" in doc and "triton is 52% of that install" in doc
    assert "| 4.321 ms |" in doc
    del candidates["xgrammar"]["size"]["requires"][:]  # no requirement left to name
    (root / RESULTS[5]).write_text(json.dumps(results))
    assert render_docs.main([], root=root) == 2
    assert "region 'results:decoding-install': its results file lacks \"xgrammar's requirement on triton\"" in \
        capsys.readouterr().err


def test_a_hand_edited_number_is_put_back(tmp_path):
    root = copy_tree(tmp_path)
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("| 0.997 [", "| 0.5 [", 1))
    assert render_docs.main(["--check"], root=root) == 1
    render_docs.main([], root=root)
    assert readme.read_text() == (ROOT / "README.md").read_text()


@pytest.mark.parametrize("text, message", [
    ("<!-- results:nope -->x<!-- /results -->", "README.md: unknown region 'results:nope'"),
    ("<!-- results:panels -->\nno end", "README.md: a '<!-- results:NAME -->' marker has no '<!-- /results -->'"),
])
def test_a_bad_region_is_one_clear_line(tmp_path, capsys, text, message):
    root = copy_tree(tmp_path)
    (root / "README.md").write_text(text)
    assert render_docs.main([], root=root) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_results_file_of_another_shape_names_the_region(tmp_path, capsys):
    root = copy_tree(tmp_path)
    (root / RESULTS[3]).write_text(json.dumps({"rows": [{"name": "x"}]}))
    assert render_docs.main([], root=root) == 2
    assert "README.md: region 'results:benchmarks': its results file lacks 'ratio'" in capsys.readouterr().err


def test_readme_is_short_and_no_doc_keeps_a_build_log():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for doc in render_docs.doc_files():
        log = re.findall(r"\b[Bb]uilds? \d+", doc.read_text())
        assert not log, f"{doc.name} names builds {log}: the docs describe the recipe, not its history"


def readme_commands(prefix: str) -> list[list[str]]:
    """Every command of the README's bash blocks that starts with ``prefix``, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if prefix in line]


def test_the_readme_training_commands_parse_as_configs():
    commands = readme_commands("train_projector.py --config")
    assert len(commands) >= 4
    for words in commands:
        at = words.index("--config")
        config = load_config(ROOT / words[at + 1], words[at + 2:])
        assert config.output_dir.startswith("runs/")
    stage2 = load_config(ROOT / "configs/llava-1.5-7b.yaml", commands[-1][commands[-1].index("--config") + 2:])
    assert stage2.stage == "instruct" and stage2.data.image_aspect is None and stage2.train.projector_lr == 2e-5
