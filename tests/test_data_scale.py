"""Data at LLaVA's scale: lazy records, header-only image checks, a cached parallel preflight shared by
every rank, samples that fail to decode mid-run, and two machines each training on their own share."""

import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from vlm.config import DataConfig, load_config
from vlm.data.formats import load_records
from vlm.data.preflight import cached_check, check_records
from vlm.train import loop

ROOT = Path(__file__).resolve().parents[1]


def _turns(question: str = "<image>\nWhat is it?", reply: str = "a panel") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]


def _jpeg(colour, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").point(lambda v: (v + colour) % 256).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's header) and holds no pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale")
    for index in range(8):
        (root / f"{index}.jpg").write_bytes(_jpeg(30 * index))
    (root / "truncated.jpg").write_bytes(_jpeg(7, (160, 120))[:3000])  # its header reads; its body does not decode
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    (root / "bomb.png").write_bytes(_png_claiming(9_000, 9_000))
    return root


def test_jsonl_is_indexed_not_loaded_and_a_bad_line_is_one_bad_record(tmp_path, tiny_model):
    lines = [json.dumps({"id": f"r{i}", "image": "0.jpg", "conversations": _turns(reply=f"panel {i}")})
             for i in range(20_000)]
    lines[7] = '{"id": "broken", "conversations": [}'
    (tmp_path / "big.jsonl").write_text("\n".join(lines[:10]) + "\n\n  \n" + "\n".join(lines[10:]) + "\n")
    tracemalloc.start()
    records = load_records(tmp_path / "big.jsonl")
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # A list of Record objects holds ~1 KB a record; the index holds three numbers.
    assert len(records) == 20_000 and held < 40 * len(records)
    assert records[12].id == "r12" and records[-1].messages[1]["content"] == "panel 19999"
    assert pickle.loads(pickle.dumps(records))[3] == records[3]  # worker processes map the file themselves
    (tmp_path / "small.jsonl").write_text("\n".join(lines[:10]))
    (tmp_path / "small.json").write_text(json.dumps([json.loads(line) for line in lines[:7]], indent=2))
    small = load_records(tmp_path / "small.jsonl")
    assert list(load_records(tmp_path / "small.json")) == [small[i] for i in range(7)]
    _, processor = tiny_model
    data = DataConfig(path=str(tmp_path / "small.jsonl"), image_folder=str(tmp_path))
    (tmp_path / "0.jpg").write_bytes(_jpeg(0))
    report = check_records(load_records(data.path), processor, data)
    assert [(index, why) for index, _, why in report.problems["bad_json"]] == \
        [(7, f"{tmp_path / 'small.jsonl'}: line 8, column 36: Expecting value")]
    assert len(report.lengths) == 9


def test_the_header_check_finds_missing_empty_non_image_and_bomb_files_without_decoding(folder, tiny_model,
                                                                                       monkeypatch):
    names = ["0.jpg", "nowhere.jpg", "empty.jpg", "text.jpg", "bomb.png", "truncated.jpg"]
    records = [{"id": name, "image": name, "conversations": _turns()} for name in names]
    (folder / "probe.json").write_text(json.dumps(records))
    data = DataConfig(path=str(folder / "probe.json"), image_folder=str(folder))
    _, processor = tiny_model

    def no_decoding(self):
        raise AssertionError("the preflight decoded an image body")

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", no_decoding)
        report = check_records(load_records(data.path), processor, data)
    found = {record_id: kind for kind, bad in report.problems.items() for _, record_id, _ in bad}
    assert found == {"nowhere.jpg": "missing_image", "empty.jpg": "corrupt_image", "text.jpg": "corrupt_image",
                     "bomb.png": "corrupt_image"}
    assert "decompression bomb" in next(why for _, i, why in report.problems["corrupt_image"] if i == "bomb.png")
    assert sorted(report.lengths) == [0, 5]  # the truncated body is training's to find
    full = check_records(load_records(data.path), processor, data, decode=True)
    assert [i for _, i, _ in full.problems["corrupt_image"]] == ["empty.jpg", "text.jpg", "bomb.png", "truncated.jpg"]


def test_worker_processes_give_the_same_report_as_one_process(folder, tiny_model):
    records = [{"id": f"r{i % 50}", "image": f"{i % 9 if i % 9 < 8 else 'nowhere'}.jpg",
                "conversations": _turns(reply="word " * (i % 40))} for i in range(600)]
    (folder / "many.json").write_text(json.dumps(records))
    data = DataConfig(path=str(folder / "many.json"), image_folder=str(folder), max_length=64)
    _, processor = tiny_model
    one = check_records(load_records(data.path), processor, data, workers=1)
    two = check_records(load_records(data.path), processor, data, workers=2)
    assert one.lengths == two.lengths and one.truncated == two.truncated
    assert dict(one.problems) == dict(two.problems)
    assert set(one.problems) == {"duplicate_id", "missing_image", "too_long", "empty_turn"}


def test_the_preflight_cache_is_reused_and_a_changed_file_or_length_setting_checks_again(tmp_path, folder,
                                                                                          tiny_model):
    _, processor = tiny_model
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": str(i), "image": f"{i}.jpg", "conversations": _turns()} for i in range(4)]))
    cache = tmp_path / "cache"

    def run(**settings):
        data = DataConfig(path=str(path), image_folder=str(folder), **settings)
        return cached_check(load_records(path), processor, data, cache, loop._fingerprint(str(path)))

    first, checked = run()
    assert checked and len(first.lengths) == 4
    again, checked = run()
    assert not checked and again.lengths == first.lengths and again.total == 4
    assert not run(image_aspect="crop")[1]  # the pictures' aspect changes no length: the report stands
    assert run(max_length=64)[1] and run(template="plain")[1]
    path.write_text(json.dumps([{"id": "0", "image": "nowhere.jpg", "conversations": _turns()}]))
    changed, checked = run()
    assert checked and changed.total == 1 and list(changed.problems) == ["missing_image"]
    assert run()[1] is False and run()[0].problems["missing_image"][0][1] == "0"

    # A rank that is not its node's first waits for the report instead of checking it again.
    data = DataConfig(path=str(path), image_folder=str(folder), max_length=1000)
    waited = {}
    waiter = threading.Thread(target=lambda: waited.update(result=cached_check(
        load_records(path), processor, data, cache, loop._fingerprint(str(path)), computes=False, poll_s=0.05)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # nothing cached for max_length=1000 yet
    report, checked = cached_check(load_records(path), processor, data, cache, loop._fingerprint(str(path)))
    waiter.join(10)
    assert checked and waited["result"][1] is False and waited["result"][0].problems == report.problems


def _train_overrides(parts, folder: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.vision_tower={parts['clip']}", f"model.language_model={parts['llama']}", "stage=align",
            f"data.path={data}", "data.template=plain", f"data.image_folder={folder}", f"output_dir={out}",
            "seed=0", "train.warmup_ratio=0", "train.batch_size=4", "train.lr=5e-3", *extra]


def test_a_sample_that_fails_to_decode_mid_run_is_skipped_counted_and_reported(tmp_path, parts, folder, capsys):
    records = [{"id": f"ok{i}", "image": f"{i}.jpg", "conversations": _turns("<image>", f"panel {i}")}
               for i in range(7)]
    records.insert(3, {"id": "cut", "image": "truncated.jpg", "conversations": _turns("<image>", "a panel")})
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    # A worker process decodes: its failure reaches the summary through the shared file.
    loop.train(load_config(None, _train_overrides(parts, folder, tmp_path / "data.json", out, "train.max_steps=4",
                                                   "data.num_workers=1")))
    printed = capsys.readouterr().out
    assert "preflight: 8 records, 8 good, 0 bad" in printed
    failures = [json.loads(line) for line in (out / "decode_failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["cut", "cut"]  # once in each of the two epochs
    assert "truncated" in failures[0]["detail"]
    assert f"decode failures: 2 sample(s) skipped mid-run, 1 record(s) (ids: cut); details in {out}" in printed
    assert len(json.loads((out / "history.json").read_text())) == 4 and (out / "final").is_dir()


WORKER = """
import json, sys
from pathlib import Path
from accelerate import Accelerator
from vlm.config import load_config
from vlm.loading import build_vlm
from vlm.train import loop

config = load_config(None, sys.argv[2:])
accelerator = Accelerator(cpu=True)
model, processor = build_vlm(config.model)
dataset = loop._dataset(config, model, processor, accelerator, loop._fingerprint(config.data.path))
loader = accelerator.prepare(loop._loader(config, dataset, processor, accelerator.num_processes))
steps = [batch["ids"] for batch in loader]
Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps(
    {"machine_is_local_main": accelerator.is_local_main_process, "samples": len(dataset), "steps": steps}))
accelerator.wait_for_everyone()
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_machines_each_train_on_their_own_share(tmp_path, parts, folder):
    records = [{"id": f"r{i}", "image": f"{i % 8}.jpg", "conversations": _turns("<image>", "word " * (1 + i % 5))}
               for i in range(16)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "worker.py").write_text(WORKER)
    port = _free_port()  # a fixed port clashes with any other run on this machine
    overrides = _train_overrides(parts, folder, tmp_path / "data.json", tmp_path / "out", "train.batch_size=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "configs" / "accelerate" / "multi-node.yaml"), "--num_machines", "2", "--num_processes", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "worker.py"), str(tmp_path),
         *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for machine in machines:
        _, err = machine.communicate(timeout=240)
        assert machine.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["machine_is_local_main"] and r["samples"] == 16 for r in ranks)  # each machine's first process
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 4
    for mine, theirs in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert len(mine) == len(theirs) == 2 and not set(mine) & set(theirs)
    seen = [i for r in ranks for step in r["steps"] for i in step]
    assert sorted(seen) == sorted(r["id"] for r in records)  # every record once per epoch, across machines
