"""The measuring harness: clocks, a token clock, peak memory, paired runs, rows, the table and the plot.

Nothing here knows what is measured: :mod:`benchmarks.inference` and :mod:`benchmarks.training` hand it
two callables (project and baseline) and get back rows of same-run ratios.
"""

from __future__ import annotations

import ctypes
import dataclasses
import operator
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

MEMORY_CONVENTION = ("peak RSS of the call (Linux VmHWM, reset through /proc/self/clear_refs after malloc_trim "
                     "before it) minus the RSS before it: working memory beyond the weights already loaded")

Clock = Callable[[], float]


@dataclasses.dataclass
class Settings:
    """One run's settings; written to the results file as they are."""

    quick: bool
    repeats: int
    threads: int
    new_tokens: int  # decoded per generation, forced (min_new_tokens) so both sides decode as many
    eval_tokens: int
    train_samples: int
    train_batch: int
    bf16: str  # auto | on | off
    clock: str  # wall | cpu
    workdir: Path


def clock_for(kind: str) -> Clock:
    """``cpu``: this process's CPU time, which leaves out a shared machine's neighbours; ``wall``: elapsed."""
    return time.process_time if kind == "cpu" else time.perf_counter


# ---- clocks around generate ---------------------------------------------------------------------------
class TokenClock(BaseStreamer):
    """Records when generate hands over each new token (its first ``put`` is the prompt)."""

    def __init__(self, now: Clock) -> None:
        self.now = now
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(self.now())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def timed_generate(generate: Callable, inputs: dict, new_tokens: int, pad_token_id: int, now: Clock) -> dict:
    """Time to first token and decode tokens/s of one greedy generation of exactly ``new_tokens``."""
    clock = TokenClock(now)
    start = now()
    output = generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      streamer=clock, pad_token_id=pad_token_id)
    ttft = clock.times[0] - start
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]) if len(clock.times) > 1 else float("nan")
    return {"ttft": ttft, "decode_tps": decode, "tokens": output[0, -new_tokens:].tolist()}


@contextmanager
def first_call_times(modules: dict[str, torch.nn.Module], into: dict, now: Clock) -> Iterator[None]:
    """Time (by ``now``) of each module's first call inside the block: for generate, its prefill."""
    starts: dict[str, float] = {}
    handles = []
    for name, module in modules.items():
        def before(*_, name=name):
            starts.setdefault(name, now())

        def after(*_, name=name):
            into.setdefault(name, now() - starts[name])

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---- memory -------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak resident memory of a block, in MB above what was resident before it."""

    def __init__(self) -> None:
        self.method = "VmHWM" if _reset_peak() else "ru_maxrss (lifetime peak)"

    @contextmanager
    def measure(self, into: dict) -> Iterator[None]:
        _return_free_memory()
        _reset_peak()
        before = _rss_kb()
        yield
        into["extra_mb"] = (_peak_kb() - before) / 1024


def _return_free_memory() -> None:
    """Hand memory freed earlier back to the OS, so the next block's peak counts what it allocates itself."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may then undercount reused memory
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_kb() -> int:
    return _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kb() -> int:
    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---- paired runs and rows -----------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired(project: Callable[[], dict], baseline: Callable[[], dict], repeats: int, memory: PeakMemory,
           warmup: bool = False, before_each: Callable[[], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Alternate the two sides ``repeats`` times, swapping which goes first; ``warmup``: one untimed call each."""
    if warmup:
        project(), baseline()
    ours, theirs = [], []
    for repeat in range(repeats):
        if before_each is not None:
            before_each()
        order = ((project, ours), (baseline, theirs))
        for run, results in order if repeat % 2 == 0 else order[::-1]:
            record: dict = {}
            with memory.measure(record):
                record.update(run())
            results.append(record)
    return ours, theirs


def medians(sides: tuple[list[dict], list[dict]], names: tuple[str, str], keys: tuple[str, ...]) -> dict:
    """``{side name: {key: median over the repeats}}``: the splits that go to the results' facts."""
    return {name: {key: statistics.median(r[key] for r in results) for key in keys}
            for name, results in zip(names, sides, strict=True)}


_OPS = {"<=": operator.le, ">=": operator.ge}


@dataclasses.dataclass
class Row:
    name: str
    unit: str
    project: str  # what each side is
    baseline: str
    values: tuple[list[float], list[float]] = ((), ())
    memory: tuple[list[float], list[float]] = ((), ())
    target: tuple[str, float] | None = None
    note: str = ""
    skipped: str = ""

    def as_dict(self) -> dict:
        out = {"name": self.name, "unit": self.unit, "project": self.project, "baseline": self.baseline,
               "note": self.note}
        if self.skipped:
            return {**out, "skipped": self.skipped, "passed": None,
                    "target": None if self.target is None else " ".join(map(str, self.target))}
        ours, theirs = self.values
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        ratio = spread(ratios)
        passed = None if self.target is None else _OPS[self.target[0]](ratio["median"], self.target[1])
        return {**out, "project_value": spread(list(ours)), "baseline_value": spread(list(theirs)),
                "ratio": ratio, "target": None if self.target is None else f"{self.target[0]} {self.target[1]}",
                "passed": passed, "project_extra_mb": spread(list(self.memory[0])) if self.memory[0] else None,
                "baseline_extra_mb": spread(list(self.memory[1])) if self.memory[1] else None}


def row_from(name: str, unit: str, key: str, sides: tuple[list[dict], list[dict]], labels: tuple[str, str],
             target: tuple[str, float] | None = None, note: str = "") -> Row:
    ours, theirs = sides
    return Row(name, unit, *labels, values=([r[key] for r in ours], [r[key] for r in theirs]),
               memory=([r["extra_mb"] for r in ours if "extra_mb" in r],
                       [r["extra_mb"] for r in theirs if "extra_mb" in r]), target=target, note=note)


# ---- output -------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = [f"{'row':<46}{'project':>11}{'baseline':>11}  {'ratio [min-max]':<22}{'target':<9}{'':<6}"
             f"{'MB':>13}  note"]
    for row in rows:
        target = row["target"] or "-"
        if "skipped" in row:
            lines.append(f"{row['name']:<46}{'':>11}{'':>11}  {'skipped':<22}{target:<9}{'-':<6}{'':>13}  "
                         f"{row['skipped']}")
            continue
        ratio = row["ratio"]
        verdict = "-" if row["passed"] is None else ("pass" if row["passed"] else "MISS")
        memory = "/".join(f"{m['median']:.0f}" if m else "-" for m in (row["project_extra_mb"],
                                                                      row["baseline_extra_mb"]))
        lines.append(f"{row['name']:<46}{_num(row['project_value']['median']):>11}"
                     f"{_num(row['baseline_value']['median']):>11}  "
                     f"{ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]".ljust(92) +
                     f"{target:<9}{verdict:<6}{memory:>13}  {row['unit']}; {row['note']}")
    return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.4g}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    shown = [r for r in rows if "ratio" in r]
    figure, axis = pyplot.subplots(figsize=(8, 0.45 * len(shown) + 1.2), dpi=100)
    for y, row in enumerate(shown):
        ratio = row["ratio"]
        colour = {True: "tab:green", False: "tab:red", None: "tab:gray"}[row["passed"]]
        axis.barh(y, ratio["median"], color=colour, alpha=0.7)
        axis.plot([ratio["min"], ratio["max"]], [y, y], color="black", linewidth=1)
        if row["target"]:
            axis.plot([float(row["target"].split()[1])] * 2, [y - 0.4, y + 0.4], color="black", linestyle="--")
    axis.set_yticks(range(len(shown)), [r["name"] for r in shown], fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("ratio, project / baseline (bar: median, line: min-max, dashed: target)")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
