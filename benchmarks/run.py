"""``python benchmarks/run.py``: the project against Hugging Face Llava on the same weights, in one process.

Every figure is a ratio against a baseline measured in the same run, repeat by repeat (the two sides
alternate and swap who goes first, so a neighbour's load hits both); the table shows the median ratio
and its min-max spread, and the same goes to JSON (``--out``) and a PNG beside it. On a shared machine
use ``--threads 1 --clock cpu``. ``--quick`` runs everything on tiny parts in
seconds (a smoke test, not a measurement).

This file is the command line; the harness is ``benchmarks/harness.py``, the rows are measured in
``benchmarks/inference.py`` and ``benchmarks/training.py``, and ``benchmarks/data.py`` is the data suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project is one level up

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.harness import MEMORY_CONVENTION, PeakMemory, Settings, plot, table  # noqa: E402
from benchmarks.inference import BANDWIDTH_CONVENTION, InferenceSuite  # noqa: E402
from benchmarks.training import training  # noqa: E402
from vlm.cli import ArgumentParser, UsageError, fail, set_verbosity  # noqa: E402

GROUPS = ("first_turn", "second_turn", "token_cut", "batched_eval", "training", "bf16")  # rows of --out
ALL_GROUPS = (*GROUPS, "data")  # data (benchmarks/data.py, into data_results.json beside --out): only when named


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny parts, one repeat: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the models are built and kept between runs (default runs/benchmark; "
                             "quick: a temporary folder)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared machine "
                             "(use with --threads 1)")
    parser.add_argument("--only", default=None, metavar="GROUPS",
                        help=f"comma-separated groups to re-measure ({', '.join(ALL_GROUPS)}); the other groups' "
                             "rows are kept from the existing --out file (each row is a same-run ratio on its own); "
                             "data runs benchmarks/data.py into data_results.json beside --out")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="auto: run bf16 rows only if a bf16 matmul is at least half as fast as fp32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as error:
        return fail(error)
    set_verbosity(args.verbose)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1 or (args.threads is not None and args.threads < 1):
        print("error: --repeats and --threads must be at least 1", file=sys.stderr)
        return 2
    chosen = GROUPS if args.only is None else tuple(g.strip() for g in args.only.split(",") if g.strip())
    unknown = [g for g in chosen if g not in ALL_GROUPS]
    if unknown or not chosen:
        print(f"error: --only takes groups from {', '.join(ALL_GROUPS)} (got {args.only!r})", file=sys.stderr)
        return 2
    only = tuple(g for g in GROUPS if g in chosen)
    if only and only != GROUPS and not args.out.is_file():
        print(f"error: --only keeps the other groups' rows from {args.out}, which does not exist", file=sys.stderr)
        return 2
    if "data" in chosen and (code := run_data(args.out.with_name("data_results.json"), args.quick)):
        return code
    if not only:
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or (Path(scratch) if args.quick else ROOT / "runs" / "benchmark")
        settings = Settings(quick=args.quick, repeats=repeats, threads=torch.get_num_threads(),
                            new_tokens=4 if args.quick else 16, eval_tokens=4 if args.quick else 16,
                            train_samples=8 if args.quick else 64, train_batch=4 if args.quick else 8,
                            bf16=args.bf16, clock=args.clock, workdir=workdir)
        return run(settings, args.out, only)


def run_data(out: Path, quick: bool) -> int:
    """The data pipeline suite (benchmarks/data.py: 665K records, or a smoke run in a scratch folder)."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, str(ROOT / "benchmarks" / "data.py"), "--out", str(out)]
        return subprocess.run([*command, "--quick", "--workdir", scratch] if quick else command).returncode


def run(settings: Settings, out: Path, only: tuple[str, ...] = GROUPS) -> int:
    """Measure the ``only`` groups, keep the others' rows from ``out``, and write ``out`` and its PNG."""
    previous = json.loads(out.read_text()) if only != GROUPS else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".partial").write_text("")
        out.with_suffix(".partial").unlink()
    except OSError as error:
        print(f"error: cannot write {out}: {error.strerror}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    memory = PeakMemory()
    # Later groups read earlier ones' facts (bf16 compares with the fp32 first turn), under --only from `out`.
    facts: dict = dict(previous["facts"]) if previous else {}
    # The two models are built and loaded only for the groups that measure them.
    inference = InferenceSuite(settings, memory, facts) if set(only) & set(InferenceSuite.GROUPS) else None
    rows: list[dict] = []
    for group in tqdm(GROUPS, desc="benchmark", unit="group"):
        if group not in only:
            rows += [row for row in previous["rows"] if row.get("group") == group]
            continue
        measured = training(settings, memory) if group == "training" else getattr(inference, group)()
        rows += [{**row.as_dict(), "group": group} for row in measured]
    settings_out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
    if previous:
        settings_out = {**previous["settings"], "groups_remeasured": {**previous["settings"].get(
            "groups_remeasured", {}), **{group: settings_out for group in only}}}
    result = {"settings": settings_out, "facts": facts, "bandwidth_convention": BANDWIDTH_CONVENTION,
              "memory_convention": f"{MEMORY_CONVENTION} [{memory.method}]", "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(table(rows))
    print(f"\nthreads {settings.threads}, repeats {settings.repeats}, fp32 unless the row says bf16; "
          f"ratio = project / baseline per repeat (for throughput rows higher is better)")
    print(f"bandwidth: {BANDWIDTH_CONVENTION}")
    print(f"memory (MB column, project/baseline): {MEMORY_CONVENTION} [{memory.method}]")
    print(f"facts: {json.dumps(facts, default=str)}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
