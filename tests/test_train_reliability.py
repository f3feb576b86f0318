"""Training loses nothing and runs nothing from a file: output folders, checkpoints, final/, QLoRA, precision."""

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from vlm import ModelConfig, build_vlm
from vlm.config import load_config
from vlm.train import loop
from vlm.train.loop import train
from vlm.train.stages import configure_stage

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Eight images with a caption file (stage 1) and a conversation file (stage 2)."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    captions, chats = [], []
    for index in range(8):
        name = list(COLOURS)[index % 4]
        Image.new("RGB", (56, 56), COLOURS[name]).save(root / "images" / f"{index}.png")
        captions.append({"id": f"c{index}", "image": f"images/{index}.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"the panel is {name}"}]})
        chats.append({"id": f"q{index}", "image": f"images/{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the panel ?"}, {"from": "gpt", "value": name}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instruct.json").write_text(json.dumps(chats))
    return root


def _overrides(parts, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.vision_tower={parts['clip']}", f"model.language_model={parts['llama']}", "stage=align",
            f"data.path={data / 'captions.json'}", "data.template=plain", f"data.image_folder={data}",
            f"output_dir={out}", "seed=0", "train.warmup_ratio=0", "train.batch_size=4", "train.lr=5e-3", *extra]


def _config(parts, data: Path, out: Path, *extra: str):
    return load_config(None, _overrides(parts, data, out, *extra))


def _main(capsys, *overrides: str) -> tuple[int, str]:
    """train_projector.py in this process: its exit code and its one error line (progress bars aside)."""
    spec = importlib.util.spec_from_file_location("train_projector", ROOT / "train_projector.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["--config", str(ROOT / "configs" / "tiny.yaml"), *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return code, errors[0]


def test_a_training_run_is_quiet_unless_verbose(tmp_path, parts, data):
    """No library warnings or weight-loading bars by default; --verbose lets them through."""
    # 4-bit stage 2, where bitsandbytes is here: the path that draws the most library output.
    four_bit = ["train.load_in_4bit=true"] if importlib.util.find_spec("bitsandbytes") else []
    # Whatever an earlier test in this process quietened must not leak into the --verbose run.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRANSFORMERS_", "HF_HUB_DISABLE", "HF_DATASETS_DISABLE"))}
    errors = {}
    for flag in ("", "--verbose"):
        out = tmp_path / (flag or "quiet")
        result = subprocess.run([
            sys.executable, str(ROOT / "train_projector.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            *([flag] if flag else []), *_overrides(parts, data, out, "train.max_steps=1"), "stage=instruct",
            f"data.path={data / 'instruct.json'}", "data.template=chat", "train.lora_r=4", *four_bit],
            capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "trainable" in result.stdout and (out / "final").is_dir()  # its own table and result stay
        errors[flag] = result.stderr
    quiet = errors[""].replace("\r", "\n").splitlines()
    assert [line for line in quiet if "Warning" in line or "warnings.warn" in line or "Loading weights" in line] == []
    assert "kernels-community" not in errors[""]  # bitsandbytes' optional CPU kernel, looked up at import
    assert any(line.startswith("instruct:") for line in quiet)  # the run's own progress bar
    assert "Loading weights" in errors["--verbose"]
    if four_bit:  # PEFT's 4-bit preparation calls a deprecated transformers method
        assert "FutureWarning" in errors["--verbose"]


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_a_new_run_refuses_a_folder_that_holds_another_runs_checkpoints(tmp_path, parts, data):
    out = tmp_path / "run"
    train(_config(parts, data, out, "train.max_steps=6", "train.save_every=2"))
    assert _steps(out) == ["step_2", "step_4"]
    # The old run's step_4 would count as this run's latest and each new checkpoint be deleted as written.
    with pytest.raises(ValueError, match="holds another run's checkpoints.*resume=true.*overwrite=true"):
        train(_config(parts, data, out, "train.max_steps=3", "train.save_every=1"))
    assert _steps(out) == ["step_2", "step_4"]
    train(_config(parts, data, out, "train.max_steps=3", "train.save_every=1", "overwrite=true"))
    assert _steps(out) == ["step_1", "step_2"]
    assert len(json.loads((out / "history.json").read_text())) == 3


def test_resume_continues_only_the_run_with_the_same_settings_and_data(tmp_path, parts, data):
    own = tmp_path / "data"
    shutil.copytree(data, own)
    out = tmp_path / "run"
    train(_config(parts, own, out, "train.max_steps=4", "train.save_every=2"))
    with pytest.raises(ValueError, match=r"train\.lr=0\.005, this one has train\.lr=0\.001 \(1 setting"):
        train(_config(parts, own, out, "train.max_steps=4", "resume=true", "train.lr=1e-3"))
    captions = json.loads((own / "captions.json").read_text())
    captions[0]["conversations"][1]["value"] = "the panel is blue"
    (own / "captions.json").write_text(json.dumps(captions))
    with pytest.raises(ValueError, match="data file .*captions.json changed since .*step_2 was written"):
        train(_config(parts, own, out, "train.max_steps=4", "resume=true"))


class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint file could do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _result(final: Path) -> dict[str, torch.Tensor]:
    return {**load_file(final / "projector.safetensors"), **load_file(final / "adapter" / "adapter_model.safetensors")}


def test_resume_unpickles_nothing_and_continues_stage2_exactly(tmp_path, parts, data):
    """Projector + LoRA with dropout: two parameter groups and the RNG in use."""
    out = tmp_path / "run"
    stage2 = ["stage=instruct", f"data.path={data / 'instruct.json'}", "data.template=chat", "train.max_steps=4",
              "train.save_every=2", "train.lora_r=4", "train.lora_alpha=8", "train.lora_dropout=0.2",
              "train.projector_lr=1e-3", "train.batch_size=2"]
    straight = _result(train(_config(parts, data, out, *stage2)))
    losses = json.loads((out / "history.json").read_text())
    marker = tmp_path / "code_ran"
    # What Accelerate's load_state unpickled in full (the scheduler, the RNG states), and a stray one.
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.pkl"):
        (out / "checkpoints" / "step_2" / name).write_bytes(pickle.dumps(_Payload(marker)))
    try:
        resumed = _result(train(_config(parts, data, out, *stage2, "resume=true")))
    finally:
        assert not marker.exists(), "resuming ran code from a file in the checkpoint"
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [h["loss"] for h in json.loads((out / "history.json").read_text())] == [h["loss"] for h in losses]
    (out / "checkpoints" / "step_2" / "run.json").unlink()  # as written by an older version
    with pytest.raises(ValueError, match="step_2 has no readable run.json"):
        train(_config(parts, data, out, *stage2, "resume=true"))


def test_an_output_folder_that_cannot_take_the_run_is_refused_before_training(tmp_path, parts, data, capsys,
                                                                              monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    code, err = _main(capsys, *_overrides(parts, data, tmp_path / "file" / "out", "train.max_steps=2"))
    assert code == 2 and "output_dir" in err and "file/out cannot be written: Not a directory" in err

    def full_disk(path):
        return SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000)

    monkeypatch.setattr(shutil, "disk_usage", full_disk)
    code, err = _main(capsys, *_overrides(parts, data, tmp_path / "full", "train.max_steps=2", "train.save_every=1"))
    assert code == 2 and "0.0 MB free; this run writes about" in err
    assert not (tmp_path / "full" / "history.json").exists()


def test_no_record_left_after_preflight_is_one_line(tmp_path, parts, data, capsys):
    missing = [{"id": "m", "image": "images/none.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "bad.json").write_text(json.dumps(missing))
    (tmp_path / "empty.json").write_text("[]")
    for name in ("bad.json", "empty.json"):  # never a ZeroDivisionError
        code, err = _main(capsys, *_overrides(parts, data, tmp_path / "out", f"data.path={tmp_path / name}",
                                              "data.max_bad_fraction=1", "train.max_steps=2"))
        assert code == 2 and "record" in err


def test_final_is_swapped_in_whole_or_not_at_all(tmp_path, parts, data, monkeypatch):
    from peft import PeftModel

    out = tmp_path / "run"
    before = train(_config(parts, data, out, "train.max_steps=2"))
    files = {p.name: p.read_bytes() for p in before.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died here

    # A stage-2 result is never left without its adapter; an earlier result stays whole.
    monkeypatch.setattr(PeftModel, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_config(parts, data, out, "resume=true", "stage=instruct", f"data.path={data / 'instruct.json'}",
                      "data.template=chat", "train.max_steps=1", "train.lora_r=4"))
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == files
    with pytest.raises(KeyboardInterrupt):
        train(_config(parts, data, tmp_path / "new", "stage=instruct", f"data.path={data / 'instruct.json'}",
                      "data.template=chat", "train.max_steps=1", "train.lora_r=4"))
    assert not (tmp_path / "new" / "final").exists()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("init_from", [False, True], ids=["base", "init_from"])
def test_qlora_quantizes_the_lm_on_every_path(tmp_path, parts, data, monkeypatch, init_from):
    bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed on this platform")
    extra = []
    if init_from:  # the documented stage-2 path: start from a stage-1 folder
        model, processor = build_vlm(ModelConfig(vision_tower=str(parts["clip"]), language_model=str(parts["llama"])))
        model.save_pretrained(tmp_path / "stage1", processor, full=False)
        extra.append(f"init_from={tmp_path / 'stage1'}")
    seen = {}

    def configured(model, config):
        seen["model"] = configure_stage(model, config)
        raise _Stop

    monkeypatch.setattr(loop, "configure_stage", configured)
    with pytest.raises(_Stop):
        train(_config(parts, data, tmp_path / "out", "stage=instruct", "train.load_in_4bit=true", "train.lora_r=4",
                      *extra))
    linear = {name: module for name, module in seen["model"].language_model.named_modules()
              if isinstance(module, torch.nn.Linear) and "lora_" not in name and not name.endswith("lm_head")}
    assert linear and all(isinstance(m, bitsandbytes.nn.Linear4bit) for m in linear.values())


def test_bf16_training_keeps_fp32_master_weights(tmp_path, parts, data, monkeypatch):
    """At LLaVA's stage-2 projector rate (2e-5), bf16 storage rounds most updates away."""
    changed, seen = {}, {}

    def configured(model, config):
        model = configure_stage(model, config)
        seen.update({k: v.detach().float().clone() for k, v in model.projector.state_dict().items()})
        return model

    monkeypatch.setattr(loop, "configure_stage", configured)
    for dtype, precision in (("float32", "no"), ("bfloat16", "bf16")):
        AcceleratorState._reset_state()  # Accelerate fixes the mixed precision once per process
        try:
            final = train(_config(parts, data, tmp_path / dtype, f"model.dtype={dtype}", "train.lr=2e-5",
                                  f"train.mixed_precision={precision}", "train.max_steps=3"))
        finally:
            AcceleratorState._reset_state()
        after = load_file(final / "projector.safetensors")
        changed[dtype] = sum(int((after[k].float() != v).sum()) for k, v in seen.items()) / sum(
            v.numel() for v in seen.values())
    assert changed["float32"] > 0.9
    assert changed["bfloat16"] >= 0.95 * changed["float32"]
