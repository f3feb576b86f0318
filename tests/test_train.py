"""Two-stage training on the tiny config: what trains, that loss falls, exact resume, DDP, QLoRA, cache."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlm import ModelConfig, build_vlm, load_pretrained
from vlm.config import load_config
from vlm.train.loop import StepReport, train

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory) -> Path:
    """A small LLaVA-format dataset: a caption file (stage 1) and a conversation file (stage 2)."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    captions, chats = [], []
    for index in range(16):
        name = list(COLOURS)[index % 4]
        image = Image.new("RGB", (56 + 8 * (index % 3), 56), COLOURS[name])
        image.save(root / "images" / f"{index:03d}.png")
        captions.append({"id": f"c{index}", "image": f"images/{index:03d}.png", "conversations": [
            {"from": "human", "value": "Describe the panel briefly.\n<image>"},
            {"from": "gpt", "value": f"the panel is {name}"}]})
        chats.append({"id": f"q{index}", "image": f"images/{index:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the panel ?"},
            {"from": "gpt", "value": name},
            {"from": "human", "value": "is it green ?"},
            {"from": "gpt", "value": "yes" if name == "green" else "no"}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instruct.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    return root


def _config(parts, data: Path, out: Path, *overrides: str):
    return load_config(None, [
        f"model.vision_tower={parts['clip']}", f"model.language_model={parts['llama']}",
        f"data.image_folder={data}", f"output_dir={out}", "seed=0", "train.warmup_ratio=0",
        "train.batch_size=4", "train.log_every=1", *overrides])


def _align_config(parts, data, out, *overrides):
    return _config(parts, data, out, "stage=align", f"data.path={data / 'captions.json'}", "data.template=plain",
                   "train.lr=5e-3", "train.max_steps=12", *overrides)


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "history.json").read_text())]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stage1_then_stage2_lower_the_loss_and_train_only_their_parts(tmp_path, parts, llava_data):
    before = _state(_base_model(parts))

    stage1 = train(_align_config(parts, llava_data, tmp_path / "s1"))
    losses = _losses(tmp_path / "s1")
    assert sum(losses[-3:]) / 3 < losses[0]
    assert sorted(p.name for p in stage1.iterdir()) == ["config.json", "projector.safetensors"]
    aligned, _ = load_pretrained(stage1)
    changed = {k.split(".")[0] for k, v in _state(aligned).items() if not torch.equal(v, before[k])}
    assert changed == {"projector"}
    assert (tmp_path / "s1" / "loss.png").stat().st_size > 1000

    stage2 = train(_config(parts, llava_data, tmp_path / "s2", "stage=instruct", f"init_from={stage1}",
                           f"data.path={llava_data / 'instruct.jsonl'}", "train.lr=3e-3", "train.projector_lr=1e-3",
                           "train.lora_r=8", "train.lora_alpha=16", "train.lora_dropout=0", "train.max_steps=12"))
    losses = _losses(tmp_path / "s2")
    assert sum(losses[-3:]) / 3 < losses[0]
    peak = max(json.loads((tmp_path / "s2" / "history.json").read_text()), key=lambda h: h["lr"])
    assert peak["lr"] == pytest.approx(3e-3, rel=0.05)  # the LM's rate, logged after a step of its cosine
    assert peak["lr"] / peak["projector_lr"] == pytest.approx(3.0)
    tuned, _ = load_pretrained(stage2)
    state = _state(tuned)
    lora = [k for k in state if "lora_" in k]
    assert lora and all(k.startswith("language_model.") for k in lora)
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in state.items() if "lora_" not in k}
    assert base.keys() == before.keys()
    unchanged = [k for k in before if torch.equal(base[k], before[k])]
    assert sorted({k.split(".")[0] for k in before.keys() - set(unchanged)}) == ["projector"]
    assert not torch.equal(state["projector.linear_1.weight"], _state(aligned)["projector.linear_1.weight"])

    merged = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-m", "vlm.merge", str(stage2), str(merged)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    standalone, processor = load_pretrained(merged)
    inputs = processor(images=[llava_data / "images" / "000.png"], text=["<image>\nwhat colour is the panel ?"])
    torch.testing.assert_close(standalone(**inputs).logits, tuned(**inputs).logits, atol=1e-4, rtol=1e-4)


def _base_model(parts):
    return build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts["llama"])))[0]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, parts, llava_data):
    overrides = ["train.max_steps=8", "train.save_every=2", "train.batch_size=2", "train.grad_accum=2"]
    reference = train(_align_config(parts, llava_data, tmp_path / "straight", *overrides))

    out = tmp_path / "killed"
    args = [sys.executable, str(ROOT / "train_projector.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"model.vision_tower={parts['clip']}", f"model.language_model={parts['llama']}", "stage=align",
            f"data.path={llava_data / 'captions.json'}", "data.template=plain", f"data.image_folder={llava_data}",
            f"output_dir={out}", "seed=0", "train.warmup_ratio=0", "train.lr=5e-3", *overrides]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step_4").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "checkpoints" / "step_4").is_dir()
    # Nothing in a checkpoint is unpickled on resume: safetensors and JSON only.
    assert sorted(p.name for p in (out / "checkpoints" / "step_4").iterdir()) == [
        "history.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "progress.json",
        "rng_0.json", "rng_0.safetensors", "run.json"]
    # As if killed before step 6 was saved. The tiny run can finish the four steps left before the signal
    # lands (CI once saw `final`), so what it saved after step 4 goes too, whatever the kill cut short.
    for later in ("checkpoints/step_6", "checkpoints/step_8", "final"):
        shutil.rmtree(out / later, ignore_errors=True)
    result = subprocess.run([*args, "resume=true"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout + result.stderr
    ours = load_file(out / "final" / "projector.safetensors")
    theirs = load_file(reference / "projector.safetensors")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    assert _losses(out) == pytest.approx(_losses(tmp_path / "straight"), abs=1e-6)
    # Training seconds run on across the resume: stage 2's pace is read from them (tools.demo.recipe).
    seconds = [h["seconds"] for h in json.loads((out / "history.json").read_text())]
    assert len(seconds) == 8 and seconds == sorted(seconds) and seconds[4] > seconds[3] > 0


def _free_port() -> int:
    """A port no other run on this machine holds: two runs on Accelerate's default port hang each other."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_ddp_matches_one_process(tmp_path, parts, llava_data):
    common = ["train.max_steps=4", "train.lr=5e-3"]
    train(_align_config(parts, llava_data, tmp_path / "one", "train.batch_size=4", *common))
    args = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            str(ROOT / "train_projector.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"model.vision_tower={parts['clip']}", f"model.language_model={parts['llama']}", "stage=align",
            f"data.path={llava_data / 'captions.json'}", "data.template=plain", f"data.image_folder={llava_data}",
            f"output_dir={tmp_path / 'two'}", "seed=0", "train.warmup_ratio=0", "train.batch_size=2", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2 | per-device batch 2" in result.stdout
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-4)


def test_qlora_stage2_runs_on_cpu_and_lowers_the_loss(tmp_path, parts, llava_data):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed on this platform")
    train(_config(parts, llava_data, tmp_path / "q", "stage=instruct", "train.load_in_4bit=true",
                  f"data.path={llava_data / 'instruct.jsonl'}", "train.lr=3e-3", "train.lora_r=8",
                  "train.lora_alpha=16", "train.lora_dropout=0", "train.max_steps=10"))
    losses = _losses(tmp_path / "q")
    assert sum(losses[-3:]) / 3 < losses[0]


def test_feature_cache_folder_changes_with_the_tower_weights(tmp_path, tiny_model):
    from vlm.data.cache import FeatureCache

    model, processor = tiny_model
    before = FeatureCache.folder_for(model, processor, tmp_path)
    assert FeatureCache.folder_for(model, processor, tmp_path) == before
    weight = next(model.vision_tower.encoder.parameters())
    with torch.no_grad():
        weight[0].add_(1e-3)  # a retrained tower of the same shape must not read the old features
        try:
            assert FeatureCache.folder_for(model, processor, tmp_path) != before
        finally:
            weight[0].sub_(1e-3)


def test_feature_cache_gives_the_same_losses(tmp_path, parts, llava_data):
    train(_align_config(parts, llava_data, tmp_path / "plain", "train.max_steps=4"))
    train(_align_config(parts, llava_data, tmp_path / "cached", "train.max_steps=4", "data.cache_features=true"))
    assert _losses(tmp_path / "cached") == pytest.approx(_losses(tmp_path / "plain"), abs=1e-5)
    assert list((tmp_path / "cached").rglob("shard_*.safetensors"))


def test_on_step_hears_each_optimizer_step_once_in_order(tmp_path, parts, llava_data):
    # Two micro-batches of 2 per step, 16 records: 4 steps an epoch, so the sixth step is in epoch 2.
    reports: list[StepReport] = []
    train(_align_config(parts, llava_data, tmp_path / "run", "train.max_steps=6", "train.batch_size=2",
                        "train.grad_accum=2"), on_step=reports.append)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r.step for r in reports] == [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [r.epoch for r in reports] == [0, 0, 0, 0, 1, 1]
    assert all(r.total_steps == 6 and r.samples == 4 and r.tokens > 0 for r in reports)
    assert [r.loss for r in reports] == [h["loss"] for h in history]
    assert [r.learning_rates for r in reports] == [{"projector": h["lr"]} for h in history]
    walls, cpus = [r.wall_s for r in reports], [r.cpu_s for r in reports]
    assert walls == sorted(set(walls)) and cpus == sorted(cpus)
