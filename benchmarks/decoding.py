"""``python benchmarks/decoding.py``: which library should constrain vlm.report's decoding, measured.

Writes ``benchmarks/decoding_results.json``, which docs/constrained-decoding.md is rendered from:

- sizes (``--sizes``; needs a package index): each candidate is pip-installed into its own venv that sees
  only vlm's run-time closure (a folder of links to the distributions vlm needs, taken from this
  environment); its size is the RECORD of every distribution pip added. Without ``--sizes`` the sizes
  are kept from the existing ``--out`` file.
- the schema probe: 300 ``make_report`` texts and 19 edge cases (each bound at and past its limit, a bad
  code, an unknown enum, a truncated and an indented report) checked against what jsonschema says, and the
  same reports in other layouts (compact, spaced, indented), which an exact layout rejects. Each candidate
  runs in a subprocess of this environment if it imports here, else of its venv under ``--venvs``.
- speed, for the candidates that get the whole probe right: set-up (tokenizer wrap, compile, first mask)
  and the cost per token of feeding 30 reports one token at a time through the library's logits
  processor (consume, mask, apply to the logits), beyond the cost of the loop itself, on one thread, with
  the tests' 384-token BPE and a 32,000-token byte-level BPE trained on transformers' source.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, and as a worker in a candidate's venv

from vlm.cli import ArgumentParser, UsageError, fail, one_line, set_verbosity  # noqa: E402

# name: pip arguments, the module that says it is importable, the probe's kind, how it masks (not measured)
CANDIDATES = {
    "llguidance": (["llguidance"], "llguidance", "llguidance", "token masks in Rust"),
    "xgrammar": (["xgrammar"], "xgrammar", "xgrammar", "token masks in C++"),
    "xgrammar-notriton": (["--no-deps", "xgrammar", "apache-tvm-ffi"], "xgrammar", "xgrammar",
                          "as xgrammar, installed with --no-deps"),
    "outlines-core": (["outlines-core"], "outlines_core", "outlines-core", "regex index in Rust"),
    "outlines": (["outlines"], "outlines", "outlines", "through outlines-core"),
    "lm-format-enforcer": (["lm-format-enforcer"], "lmformatenforcer", "lmfe", "Python, character by character"),
    "transformers-cfg": (["transformers-cfg"], "transformers_cfg", None, "Python, from an EBNF grammar"),
    "formatron": (["formatron"], "formatron.schemas.json_schema", "formatron", "Rust (kbnf)"),
}
VENV_ONLY = {"xgrammar-notriton"}  # what it shows is that it runs in a venv without triton
NO_PROBE = {"transformers-cfg": "takes no JSON Schema: a hand-written EBNF grammar"}
EDGE_LABELS = ("notes 201 chars", "a quote in notes", "7 lamps", "10 damage items", "damage type rust",
               "gauge 101", "gauge -1", "code IO-1234", "code AB-12345", "severity severe", "action panic",
               'warning "yes"', "notes 200 chars", "gauge 100", "gauge 0", "6 lamps", "9 damage items",
               "a truncated report", "an indented report")
LAYOUTS = {"compact": {"separators": (",", ":")}, "spaced": {"separators": (" , ", " : ")}, "indented": {"indent": 2}}
SPEED_REPORTS = 30


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_mb(dist: metadata.Distribution) -> float:
    files = (dist.locate_file(f) for f in dist.files or [])
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f)) / 1e6


def vlm_closure(skip: set[str]) -> dict:
    """vlm's run-time distributions in this environment (markers and extras followed), minus ``skip``."""
    from packaging.requirements import Requirement

    seen, todo = {}, [("vlm", {""})]
    while todo:
        name, extras = todo.pop()
        if norm(name) in seen or norm(name) in skip:
            continue
        seen[norm(name)] = dist = metadata.distribution(name)
        for requirement in map(Requirement, dist.requires or []):
            if not requirement.marker or any(requirement.marker.evaluate({"extra": e}) for e in extras):
                todo.append((requirement.name, set(requirement.extras) | {""}))
    del seen["vlm"]
    return seen


def measure_sizes(venvs: Path) -> tuple[dict, dict]:
    """The closure's MB, and per candidate the distributions pip adds to a venv that sees only the closure."""
    from tqdm.auto import tqdm

    closure = vlm_closure(set(CANDIDATES))
    folder = venvs / "closure"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for dist in closure.values():  # link every top-level entry the distribution installed
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            src, dst = Path(dist.locate_file(top)), folder / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    mbs = {dist.metadata["Name"]: distribution_mb(dist) for dist in closure.values()}
    sizes = {}
    for name, (pip_args, *_) in (bar := tqdm(CANDIDATES.items(), desc="venvs", unit="venv")):
        bar.set_postfix_str(name)
        venv = venvs / name
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = Path(subprocess.run([venv / "bin" / "python", "-c", "import site; print(site.getsitepackages()[0])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        (site / "vlm-closure.pth").write_text(f"{folder}\n")
        pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "-q", *pip_args], capture_output=True, text=True)
        if pip.returncode:
            said = (pip.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"pip install {' '.join(pip_args)} failed: {said}")
        added = sorted(metadata.distributions(path=[str(site)]), key=distribution_mb, reverse=True)
        wanted = next(a for a in pip_args if not a.startswith("-"))
        main = next(d for d in added if norm(d.metadata["Name"]) == wanted)
        sizes[name] = {"mb": round(sum(map(distribution_mb, added)), 1), "distribution": main.metadata["Name"],
                       "version": main.version,
                       "added": [[d.metadata["Name"], d.version, round(distribution_mb(d), 1)] for d in added],
                       "requires": [r for r in main.requires or [] if "extra ==" not in r]}
    largest = sorted(mbs.items(), key=lambda item: -item[1])[:4]
    return {"mb": round(sum(mbs.values()), 1), "distributions": len(mbs),
            "largest": [[n, closure[norm(n)].version, round(mb, 1)] for n, mb in largest]}, sizes


def without_max_length_beside_pattern(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: without_max_length_beside_pattern(v) for k, v in schema.items()
                if not (k == "maxLength" and "pattern" in schema)}
    return [without_max_length_beside_pattern(v) for v in schema] if isinstance(schema, list) else schema


def probe_texts() -> dict:
    """The probe's texts and what jsonschema (and json.dumps' layout) says of each edge case."""
    import jsonschema

    from vlm.inspection import REPORT_SCHEMA, SEPARATORS, make_report
    from vlm.synth.panels import sample_truth

    reports = [make_report(sample_truth(random.Random(seed))) for seed in range(300)]
    base = make_report(sample_truth(random.Random(1)))
    crack, lamp = {"type": "crack", "location": "center", "severity": "high"}, {"label": "FAULT", "colour": "red",
                                                                                "on": True}
    changes = ({"notes": "x" * 201}, {"notes": 'say "hi"'}, {"lamps": [lamp] * 7}, {"damage": [crack] * 10},
               {"damage": [{**crack, "type": "rust"}]}, {"gauge_reading": 101}, {"gauge_reading": -1},
               {"asset_code": "IO-1234"}, {"asset_code": "AB-12345"}, {"overall_severity": "severe"},
               {"recommended_action": "panic"}, {"warning_label": "yes"}, {"notes": "x" * 200},
               {"gauge_reading": 100}, {"gauge_reading": 0}, {"lamps": [lamp] * 6}, {"damage": [crack] * 9})
    validator = jsonschema.Draft202012Validator(REPORT_SCHEMA)
    edge = [json.dumps({**base, **change}) for change in changes]
    expect = [validator.is_valid(json.loads(text)) for text in edge] + [False, False]  # truncated, indented
    edge += [json.dumps(base)[:-1], json.dumps(base, indent=2)]
    return {"schema": REPORT_SCHEMA, "separators": SEPARATORS, "good": [json.dumps(r) for r in reports],
            "edge": edge, "expect": expect,
            "layouts": {k: [json.dumps(r, **form) for r in reports[:20]] for k, form in LAYOUTS.items()}}


def acceptor(kind: str, schema: dict, job: dict) -> Callable[[str], bool]:
    """A function text -> accepted, from the candidate's own compiler of ``schema``; raises if it cannot."""
    if kind == "llguidance":
        import llguidance
        import llguidance.hf
        from transformers import AutoTokenizer

        tokenizer = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(job["tokenizer"]))
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={
            "whitespace_flexible": False, "item_separator": job["separators"][0],
            "key_separator": job["separators"][1]})
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error or messages:
            raise ValueError("; ".join(messages))

        def accepts(text: str) -> bool:
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()
        return accepts
    if kind == "xgrammar":
        import xgrammar
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer),
                                                       stop_token_ids=[tokenizer.eos_token_id])
        compiled = xgrammar.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=tuple(job["separators"]))

        def accepts(text: str) -> bool:
            matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)
            return matcher.accept_string(text) and matcher.is_completed()
        return accepts
    if kind in ("outlines-core", "outlines"):  # both compile the schema to one regex; default whitespace
        if kind == "outlines":
            from outlines.types.dsl import JsonSchema, to_regex

            regex = re.compile(to_regex(JsonSchema(json.dumps(schema))))
        else:
            from outlines_core.json_schema import build_regex_from_schema

            regex = re.compile(build_regex_from_schema(json.dumps(schema), None))
        return lambda text: regex.fullmatch(text) is not None
    if kind == "lmfe":
        from lmformatenforcer import JsonSchemaParser

        def accepts(text: str) -> bool:
            parser = JsonSchemaParser(schema)
            for char in text:
                if char not in parser.get_allowed_characters():
                    return False
                parser = parser.add_character(char)
            return parser.can_end()
        return accepts
    if kind == "formatron":
        from formatron.schemas.json_schema import create_schema

        create_schema({**schema, "$id": "https://example.com/report.json"})
        raise ValueError("it imports, but this probe has no text check for formatron yet")
    raise ValueError(f"no probe for {kind}")


def probe(kind: str, job: dict) -> dict:
    """The probe in this interpreter; the schema as it is, else with maxLength dropped beside pattern."""
    result = {"version": metadata.version(job["dist"])}
    try:
        importlib.import_module(job["module"])
    except Exception as error:  # a library that does not import here is a finding, not a crash
        return {**result, "errors": [f"does not import: {one_line(f'{type(error).__name__}: {error}')[:160]}"]}
    for form, schema in (("as is", job["schema"]),
                         ("maxLength dropped beside pattern", without_max_length_beside_pattern(job["schema"]))):
        try:
            accepts = acceptor(kind, schema, job)
            good, edge = [accepts(t) for t in job["good"]], [accepts(t) for t in job["edge"]]
            layouts = {k: sum(map(accepts, texts)) for k, texts in job["layouts"].items()}
        except Exception as error:  # the library's own message is the finding
            result.setdefault("errors", []).append(f"{form}: {one_line(f'{type(error).__name__}: {error}')[:160]}")
            continue
        return {**result, "schema_form": form, "good_accepted": sum(good), "edge_accepted": edge,
                "layouts_accepted": layouts}
    return result


def processor_factory(kind: str, tokenizer: Any, vocab: int, job: dict) -> Callable[[], Any]:
    """Wrap the tokenizer and compile; returns a function making a fresh logits processor for one report."""
    if kind == "llguidance":
        import llguidance.hf

        from vlm.report import GrammarLogitsProcessor, compile_report_grammar

        wrapped = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=[tokenizer.eos_token_id])
        grammar = compile_report_grammar(wrapped, job["schema"])
        return lambda: GrammarLogitsProcessor(wrapped, grammar)
    import xgrammar
    import xgrammar.contrib.hf

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    compiled = xgrammar.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
        json.dumps(job["schema"]), any_whitespace=False, separators=tuple(job["separators"]))
    return lambda: xgrammar.contrib.hf.LogitsProcessor(compiled)


def speed(kind: str, job: dict) -> list[dict]:
    """Set-up and per-token cost of the constraint alone, per tokenizer, on one thread."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    importlib.import_module("vlm.report" if kind == "llguidance" else "xgrammar.contrib.hf")  # not timed

    def feed(reports: list[list[int]], make: Callable[[], Any] | None, vocab: int) -> float:
        start = time.perf_counter()
        for report in reports:
            ids, processor = torch.zeros(1, 1, dtype=torch.long), make() if make else None
            for token in report:
                scores = torch.zeros(1, vocab)
                if processor and not torch.isfinite(processor(ids, scores)[0, token]):
                    raise RuntimeError(f"{kind} masked token {token} of a valid report")
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
        return time.perf_counter() - start

    rows = []
    for label, path in job["tokenizers"].items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        vocab = len(tokenizer)
        reports = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for t in job["good"][:SPEED_REPORTS]]
        tokens = sum(map(len, reports))
        start = time.perf_counter()
        make = processor_factory(kind, tokenizer, vocab, job)
        make()(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, vocab))
        setup = time.perf_counter() - start
        constrained, loop = feed(reports, make, vocab), feed(reports, None, vocab)
        rows.append({"tokenizer": label, "vocab": vocab, "tokens": tokens, "setup_ms": round(setup * 1e3, 1),
                     "per_token_ms": round((constrained - loop) / tokens * 1e3, 3)})
    return rows


def run_worker(python: str, task: str, kind: str, job: dict) -> dict | list:
    """``task`` (probe or speed) for one library in ``python``'s interpreter, with the warnings it printed."""
    done = subprocess.run([python, __file__, "--worker", task, kind], input=json.dumps(job), capture_output=True,
                          text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode:
        return {"errors": [f"the worker failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}"]}
    result = json.loads(done.stdout)
    warned = [re.sub(r".*?warning:\s*", "", line, flags=re.I) for line in done.stderr.splitlines()
              if re.search(r"warning:", line, re.I)]
    return {**result, "warnings": list(dict.fromkeys(warned))} if warned and task == "probe" else result


def interpreter(name: str, venvs: Path) -> tuple[str, str] | None:
    """Where a candidate imports: this environment, else its venv."""
    module = CANDIDATES[name][1].split(".")[0]
    if importlib.util.find_spec(module) is not None and name not in VENV_ONLY:
        return sys.executable, "this environment"
    python = venvs / name / "bin" / "python"
    found = python.is_file() and subprocess.run([python, "-c", f"import importlib.util as u, sys; sys.exit("
                                                 f"u.find_spec({module!r}) is None)"]).returncode == 0
    return (str(python), f"venv {name}") if found else None


def build_tokenizers(workdir: Path) -> dict:
    import transformers

    from vlm.testing import train_tokenizer

    paths = {"tests' BPE": workdir / "bpe384", "byte-level BPE": workdir / "bpe32k"}
    if not (paths["tests' BPE"] / "tokenizer.json").is_file():
        train_tokenizer(paths["tests' BPE"], 384, "llama3")
    if not (paths["byte-level BPE"] / "tokenizer.json").is_file():
        files = sorted(Path(transformers.__file__).parent.rglob("*.py"))[:1500]
        corpus = [line for f in files for line in f.read_text(errors="ignore").splitlines()]
        train_tokenizer(paths["byte-level BPE"], 32000, "llama3", corpus=corpus)
    return {label: str(path) for label, path in paths.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", action="store_true",
                        help="(re)build each candidate's venv with pip and measure what it adds (needs a package "
                             "index, minutes); without it the sizes are kept from --out")
    parser.add_argument("--venvs", type=Path, default=ROOT / "runs" / "decoding" / "venvs",
                        help="where the candidates' venvs are built (--sizes) and looked for (default %(default)s)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "decoding",
                        help="where the two tokenizers are trained and kept (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "decoding_results.json")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "KIND"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, load: list[float]) -> dict:
    import torch
    from tqdm.auto import tqdm

    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.sizes:
        closure, sizes = measure_sizes(args.venvs.resolve())
    else:
        closure, sizes = old.get("closure"), {c["name"]: c.get("size") for c in old.get("candidates", [])}
    tokenizers = build_tokenizers(args.workdir)
    job = {**probe_texts(), "tokenizers": tokenizers, "tokenizer": tokenizers["tests' BPE"]}
    kept = {c["name"]: c for c in old.get("candidates", [])}
    candidates, timed = [], {}
    for name, (pip_args, module, kind, how) in (bar := tqdm(CANDIDATES.items(), desc="probe", unit="candidate")):
        bar.set_postfix_str(name)
        found = interpreter(name, args.venvs)
        row = {"name": name, "how": how, "size": sizes.get(name), "where": found and found[1]}
        if name in NO_PROBE:
            row["probe"] = {"errors": [NO_PROBE[name]]}
        elif found is None and name in kept:  # no venv here (CI): its last measured probe and speed stay
            row.update(where=kept[name]["where"], probe=kept[name]["probe"])
            if kind in old.get("speed", {}):
                timed.setdefault(kind, old["speed"][kind])
        elif found is None:
            row["probe"] = {"errors": ["not installed here nor in a venv under --venvs"]}
        else:
            dist = next(a for a in pip_args if not a.startswith("-"))
            row["probe"] = probed = run_worker(found[0], "probe", kind, {**job, "module": module, "dist": dist})
            right = probed.get("edge_accepted") == job["expect"] and probed["good_accepted"] == len(job["good"])
            if right and kind not in timed:  # speed only for a library that gets the whole schema right
                bar.set_postfix_str(f"{name}, speed")
                schema = job["schema"] if probed["schema_form"] == "as is" else \
                    without_max_length_beside_pattern(job["schema"])
                timed[kind] = run_worker(found[0], "speed", kind, {**job, "schema": schema})
        candidates.append(row)
    return {"settings": {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
                         "torch": torch.__version__, "threads": 1, "reports": len(job["good"]),
                         "speed_reports": SPEED_REPORTS, "load_average_at_start": load},
            "edge_cases": [{"label": label, "valid": valid}
                           for label, valid in zip(EDGE_LABELS, job["expect"], strict=True)],
            "closure": closure, "candidates": candidates, "speed": timed}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as error:
        return fail(error, "decoding.py")
    set_verbosity(args.verbose)
    load = [round(x, 2) for x in os.getloadavg()]
    if args.worker:
        task, kind = args.worker
        print(json.dumps((probe if task == "probe" else speed)(kind, json.load(sys.stdin))))
        return 0
    try:
        results = measure(args, load)
    except (OSError, RuntimeError, ValueError, ImportError, subprocess.CalledProcessError) as error:
        return fail(error, "decoding.py")
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
