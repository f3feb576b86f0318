"""``python benchmarks/data.py``: the data pipeline at LLaVA-1.5's scale, on synthetic records it writes.

Records are LLaVA-shaped (mix665k: 1-4 rounds, ``<image>`` first, 1 in 10 text-only) over a few thousand
distinct 640x480 JPEGs reused across records, tokenized by a Vicuna-style sentencepiece tokenizer with
LLaVA-1.5's conversation template and 576 visual tokens per image (a tiny random-weight model of those
shapes: the data side is what is measured). Rows: the preflight's records/s on 1 and on every core, the
first optimizer step of a full run uncached, cached and after a resume (``train_projector.py`` in a
subprocess, from launch), the loader's samples/s with 0, 1, 2 workers, and the peak memory of the data
pipeline at 10K, 100K and 1M records. Writes ``benchmarks/data_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project is one level up

WORDS = ("the a panel gauge lamp red green blue white black left right top bottom near far small large man woman "
         "dog cat car street table chair window door sky tree water two three four many some what where how why "
         "is are was on in at of with and or but this that there picture image photo shows shown color shape "
         "sign text number people person sitting standing holding wearing looking building road light dark").split()
QUESTIONS = ("What is shown in the image?", "Describe the image in detail.", "What color is the car?",
             "How many people are there?", "What is the man holding?", "Where is the dog sitting?")


def cpu_seconds() -> float:
    """CPU time of this process and of every child it has waited for (pool workers, subprocesses)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_parts(work: Path) -> tuple[Path, Path]:
    from vlm.testing import tiny_lm, tiny_tower

    tower, lm = work / "tower", work / "lm"
    if not (tower / "config.json").is_file():
        tiny_tower(tower, "clip", image_size=336, patch_size=14, hidden_size=32, layers=2)
    if not (lm / "config.json").is_file():
        tiny_lm(lm, "llama", tokenizer="sentencepiece")
    return tower, lm


def write_images(folder: Path, count: int) -> None:
    """Photo-sized JPEGs (640x480, quality 90): noise over colour blocks, so decoding costs what a photo's does."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    noise = Image.effect_noise((640, 480), 60).convert("RGB")
    for index in range(count):
        path = folder / f"{index:05d}.jpg"
        if path.is_file():
            continue
        base = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(6):
            x, y = rng.randrange(560), rng.randrange(400)
            base.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + rng.randrange(20, 300),
                                                                      y + rng.randrange(20, 240)))
        Image.blend(base, noise.rotate(rng.randrange(360)), 0.35).save(path, quality=90)


def write_records(path: Path, count: int, images: int) -> None:
    """LLaVA mix665k-shaped JSONL: ids, an image path (9 in 10), 1-4 rounds of question and answer."""
    if path.is_file():
        return
    rng = random.Random(count)
    sentences = [" ".join(rng.choices(WORDS, k=rng.randint(4, 30))) + "." for _ in range(4000)]
    partial = path.with_suffix(".partial")
    with open(partial, "w") as out:
        for index in range(count):
            rounds = rng.randint(1, 4)
            turns = []
            for r in range(rounds):
                question = rng.choice(QUESTIONS) if r == 0 else rng.choice(sentences)
                turns += [{"from": "human", "value": question},
                          {"from": "gpt", "value": " ".join(rng.choices(sentences, k=rng.randint(1, 4)))}]
            record = {"id": f"{index:09d}", "conversations": turns}
            if rng.random() < 0.9:
                record["image"] = f"images/{rng.randrange(images):05d}.jpg"
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            out.write(json.dumps(record) + "\n")
    os.replace(partial, path)


def overrides(work: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.vision_tower={work / 'tower'}", f"model.language_model={work / 'lm'}",
            "model.chat_template=vicuna_v1", "stage=instruct", "train.lora_r=4", "train.lora_alpha=8",
            f"data.path={data}", f"data.image_folder={work}", "data.template=chat", "data.max_length=2048",
            "data.on_too_long=truncate",
            f"output_dir={out}", "train.batch_size=4", "train.max_steps=2", "train.save_every=1", *extra]


def timed_run(args: list[str]) -> dict:
    """``train_projector.py`` from launch: seconds to the line printed just before the loop, and CPU seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    before = cpu_seconds()
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / "train_projector.py"), "--config",
                                str(ROOT / "configs" / "tiny.yaml"), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    ready, lines = [None], []

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if ready[0] is None and line.startswith("processes "):
                ready[0] = time.perf_counter() - start

    reader = threading.Thread(target=read)
    reader.start()
    err = process.stderr.read()
    process.wait()
    reader.join()
    if process.returncode != 0 or ready[0] is None:
        raise RuntimeError(f"training run failed ({process.returncode}): {err[-2000:]}")
    return {"ready_s": ready[0], "wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - before,
            "stdout": "".join(lines)}


def step_times(out: Path, run: dict, resumed: bool) -> float:
    """Seconds from launch to the run's first optimizer step (the next one, after a resume)."""
    history = json.loads((out / "history.json").read_text())
    seconds = history[1]["seconds"] - history[0]["seconds"] if resumed else history[0]["seconds"]
    return run["ready_s"] + seconds


def preflight_rate(work: Path, data: Path, count: int, workers: int) -> dict:
    from vlm.config import DataConfig
    from vlm.data.formats import load_records
    from vlm.data.preflight import check_records
    from vlm.loading import build_vlm
    from vlm.model import ModelConfig

    _, processor = build_vlm(ModelConfig(vision_tower=str(work / "tower"), language_model=str(work / "lm"),
                                         chat_template="vicuna_v1"))
    config = DataConfig(path=str(data), image_folder=str(work), template="chat", max_length=2048,
                        on_too_long="truncate")
    records = load_records(data)

    class Prefix:  # the first ``count`` records of the file
        def __len__(self):
            return count

        def __getitem__(self, index):
            return records[index]

    before, start = cpu_seconds(), time.perf_counter()
    report = check_records(Prefix(), processor, config, workers=workers)
    wall = time.perf_counter() - start
    return {"records": count, "workers": workers, "wall_s": wall, "cpu_s": cpu_seconds() - before,
            "records_per_s": count / wall, "cpu_ms_per_record": 1000 * (cpu_seconds() - before) / count,
            "good": len(report.lengths)}


def loader_rate(work: Path, data: Path, workers: int, batches: int, batch_size: int) -> dict:
    """Samples/s the training loader delivers (decode, pad to 336, normalise, tokenize, collate)."""
    from vlm.config import load_config
    from vlm.data.dataset import VLMDataset
    from vlm.data.formats import load_records
    from vlm.data.preflight import check_records
    from vlm.loading import build_vlm
    from vlm.train import loop

    config = load_config(ROOT / "configs" / "tiny.yaml", overrides(work, data, work / "loader", f"data.num_workers="
                                                                   f"{workers}", f"train.batch_size={batch_size}"))
    _, processor = build_vlm(config.model)
    records = load_records(data)
    report = check_records(records, processor, config.data)
    import torch

    loader = loop._loader(config, VLMDataset(records, processor, config.data, report.lengths), processor, 1,
                          pin_memory=torch.cuda.is_available())
    iterator = iter(loader)
    next(iterator)  # workers started and their first batch made: the rate is the steady one
    start = time.perf_counter()
    samples = sum(len(next(iterator)["ids"]) for _ in range(batches))
    wall = time.perf_counter() - start
    del iterator, loader
    return {"workers": workers, "samples": samples, "wall_s": wall, "samples_per_s": samples / wall}


def memory_probe(work: Path, data: Path) -> dict:
    """Peak RSS of the data pipeline over ``data``: index, (cached) preflight, dataset, sampler, 4 batches."""
    from vlm.config import load_config
    from vlm.data.dataset import VLMDataset
    from vlm.data.formats import load_records
    from vlm.data.preflight import cached_check
    from vlm.loading import build_vlm
    from vlm.train import loop

    config = load_config(ROOT / "configs" / "tiny.yaml", overrides(work, data, work / "memory"))
    _, processor = build_vlm(config.model)
    base, base_anon, peak_anon, done = rss_kb("VmRSS"), rss_kb("RssAnon"), [0], threading.Event()

    def sample() -> None:  # RssAnon leaves out the mapped data file's pages (page cache the kernel can drop)
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], rss_kb("RssAnon"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    records = load_records(data)
    report, checked = cached_check(records, processor, config.data, work / "memory" / "preflight",
                                   loop._fingerprint(str(data)))
    dataset = VLMDataset(records, processor, config.data, report.lengths)
    iterator = iter(loop._loader(config, dataset, processor, 1))
    for _ in range(4):
        next(iterator)
    done.set()
    sampler.join()
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"records": len(records), "base_mb": base / 1024, "peak_mb": rss_kb("VmHWM") / 1024,
            "data_mb": (rss_kb("VmHWM") - base) / 1024, "anon_data_mb": (peak_anon[0] - base_anon) / 1024,
            "largest_worker_mb": child / 1024, "checked": checked}


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def in_subprocess(function: str, *args: str) -> dict:
    """Run one measurement in a fresh process (its memory and imports its own); returns its JSON answer."""
    result = subprocess.run([sys.executable, __file__, "--probe", function, *args], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode != 0:
        raise RuntimeError(f"{function} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=665_000, help="records of the full training runs")
    parser.add_argument("--memory-sizes", default="10000,100000,1000000")
    parser.add_argument("--rate-records", type=int, default=20_000, help="records the preflight rates are timed on")
    parser.add_argument("--images", type=int, default=2000, help="distinct 640x480 JPEGs, reused across records")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "data-benchmark")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "data_results.json")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in a minute, no measurement")
    parser.add_argument("--only-memory", action="store_true", help="re-measure the memory rows only (into --out)")
    parser.add_argument("--skip-memory", action="store_true", help="keep --out's memory rows, re-measure the rest")
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:  # one measurement in this fresh process
        name, *rest = args.probe
        if name == "memory":
            answer = memory_probe(Path(rest[0]), Path(rest[1]))
        elif name == "loader":
            answer = loader_rate(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]))
        else:
            answer = preflight_rate(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))
        print(json.dumps(answer))
        return 0
    if args.quick:
        args.records, args.memory_sizes, args.rate_records, args.images = 3000, "1000,3000", 600, 40
    try:
        sizes = [int(size) for size in args.memory_sizes.split(",")]
    except ValueError:
        print(f"error: --memory-sizes takes comma-separated counts (got {args.memory_sizes!r})", file=sys.stderr)
        return 2
    if min([args.records, args.rate_records, args.images, *sizes]) < 1:
        print("error: --records, --rate-records, --images and --memory-sizes must be at least 1", file=sys.stderr)
        return 2
    from vlm.data.preflight import cpu_count

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build_parts(work)
    write_images(work / "images", args.images)
    full = work / f"records_{args.records}.jsonl"
    write_records(full, args.records, args.images)
    print(f"data written ({time.perf_counter() - started:.0f} s): {full} ({full.stat().st_size / 1e6:.0f} MB)")
    cores = cpu_count()
    result = {"settings": {"records": args.records, "images": args.images, "image_size": "640x480 JPEG q90",
                           "cores": cores, "rate_records": args.rate_records, "memory_sizes": sizes,
                           "tokenizer": "sentencepiece (Vicuna-style), vicuna_v1 template",
                           "tokens_per_image": 576, "quick": args.quick}}

    if args.only_memory and args.out.is_file():
        result = {**json.loads(args.out.read_text()), "memory": []}
    kept = json.loads(args.out.read_text()).get("memory", []) if args.skip_memory and args.out.is_file() else []

    def save() -> None:  # after every section: a run cut short keeps what it measured
        result["seconds"] = time.perf_counter() - started
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    if not args.only_memory:
        measure_runs(args, work, full, cores, sizes, result, save)
    result["memory"] = kept
    for size in [] if args.skip_memory else sizes:
        path = work / f"records_{size}.jsonl"
        write_records(path, size, args.images)
        result["memory"].append(in_subprocess("memory", str(work), str(path)))
        print(f"memory at {size} records: peak {result['memory'][-1]['peak_mb']:.0f} MB "
              f"({result['memory'][-1]['data_mb']:.0f} MB over the process before the data, "
              f"{result['memory'][-1]['anon_data_mb']:.0f} MB of it not the mapped file)")
        save()
    save()
    print(f"wrote {args.out}")
    return 0


def measure_runs(args: argparse.Namespace, work: Path, full: Path, cores: int, sizes: list[int], result: dict,
                 save) -> None:
    """The preflight rates, the three training runs and the loader rows."""
    rates = [in_subprocess("preflight", str(work), str(full), str(args.rate_records), str(w))
             for w in sorted({1, cores})]
    result["preflight"] = rates
    shown = ", ".join(f"{r['records_per_s']:.0f} records/s on {r['workers']} process(es)" for r in rates)
    print(f"preflight: {shown}")
    save()

    out = work / "run"
    for cache in (work / "cache" / "preflight_cache").glob("*"):
        cache.unlink()  # the first run checks from nothing; the next ones read what it wrote
    uncached = timed_run([*overrides(work, full, out), "overwrite=true", f"data.cache_dir={work / 'cache'}"])
    first_uncached = step_times(out, uncached, False)
    cached = timed_run([*overrides(work, full, out), "overwrite=true", f"data.cache_dir={work / 'cache'}"])
    first_cached = step_times(out, cached, False)
    resumed = timed_run([*overrides(work, full, out), "resume=true", f"data.cache_dir={work / 'cache'}"])
    first_resumed = step_times(out, resumed, True)
    result["runs"] = {
        "uncached_first_step_s": first_uncached, "uncached_cpu_s": uncached["cpu_s"],
        "cached_first_step_s": first_cached, "cached_cpu_s": cached["cpu_s"],
        "resume_next_step_s": first_resumed, "resume_cpu_s": resumed["cpu_s"],
        "resumed_from": "step_1" if "resumed from" in resumed["stdout"] else None}
    print(f"{args.records} records: first step {first_uncached:.0f} s uncached ({uncached['cpu_s'] / 60:.1f} CPU-min), "
          f"{first_cached:.1f} s cached; resume reaches its next step in {first_resumed:.1f} s")
    save()

    small = work / f"records_{sizes[0]}.jsonl"
    write_records(small, sizes[0], args.images)
    result["loader"] = [in_subprocess("loader", str(work), str(small), str(w), "4" if args.quick else "12", "8")
                        for w in (0, 1, 2)]
    shown = ", ".join(f"{r['samples_per_s']:.1f} samples/s ({r['workers']} workers)" for r in result["loader"])
    print(f"loader: {shown}")
    save()


if __name__ == "__main__":
    sys.exit(main())
