"""chat.py and the chat session: streamed answers, one tower run per chat, one-line errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.hf_llava import export_llava
from vlm.session import ChatSession

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_model):
    model, processor = tiny_model
    root = tmp_path_factory.mktemp("chat")
    model.save_pretrained(root / "project", processor)
    export_llava(model, processor, root / "llava")
    Image.new("RGB", (90, 60), (30, 140, 60)).save(root / "panel.png")
    return root


def _chat(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_session_runs_the_tower_once_and_extends_the_cache(tiny_model):
    model, processor = tiny_model
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        session = ChatSession(model, processor, Image.new("RGB", (70, 50), (200, 10, 10)), max_new_tokens=5)
        pieces: list[str] = []
        first = session.ask("what is the asset code ?", on_text=pieces.append)
        assert "".join(pieces).strip() == first
        seen_after_first = session.token_ids.shape[1]
        session.ask("is the fault lamp on ?")
        session.ask("what does the gauge read ?")
        assert len(calls) == 1 and session.full_reencodes == 0
        assert session.token_ids.shape[1] > seen_after_first
        # The cached conversation equals what a fresh encoding of the same turns would hold.
        assert session.cache.get_seq_length() == session.token_ids.shape[1] - 1
    finally:
        hook.remove()


@pytest.mark.parametrize("folder", ["project", "llava"])
def test_prompt_answers_once_with_project_and_llava_folders(saved_models, folder):
    result = _chat("--image", str(saved_models / "panel.png"), "--model", str(saved_models / folder),
                   "--prompt", "what is the asset code ?", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stderr == ""  # quiet by default: no loading bars or library warnings


def test_interactive_mode_reads_turns_from_stdin(saved_models):
    result = _chat("--image", str(saved_models / "panel.png"), "--model", str(saved_models / "project"),
                   "--max-new-tokens", "3", stdin="what is the code ?\nis the lamp on ?\nexit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("vlm> ") == 2 and result.stderr == ""


def test_bad_inputs_get_one_line_and_exit_2(saved_models, tmp_path):
    (tmp_path / "not-an-image.jpg").write_text("hello")
    cases = {
        "does not exist": ["--image", str(tmp_path / "missing.png"), "--model", str(saved_models / "project")],
        "cannot be read": ["--image", str(tmp_path / "not-an-image.jpg"), "--model", str(saved_models / "project")],
        "has no config.json": ["--image", str(saved_models / "panel.png"), "--model", str(tmp_path)],
    }
    for expected, args in cases.items():
        result = _chat(*args, "--prompt", "hi")
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last and "Traceback" not in result.stderr


def test_odd_but_valid_images_get_an_answer(tiny_model, tmp_path):
    model, processor = tiny_model
    rgb = Image.new("RGB", (40, 30), (10, 120, 240))
    variants = {
        "grey.png": rgb.convert("L"), "palette.png": rgb.convert("P"), "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"), "grey16.png": Image.fromarray((torch.arange(1200).reshape(30, 40) * 50)
                                                                      .numpy().astype("uint16")),
    }
    for name, image in variants.items():
        image.save(tmp_path / name)
        session = ChatSession(model, processor, Image.open(tmp_path / name), max_new_tokens=2)
        assert isinstance(session.ask("what is shown ?"), str)


def test_folders_files_and_corrupt_weights_get_one_line_naming_them(saved_models, tmp_path):
    project, picture = saved_models / "project", saved_models / "panel.png"
    cut, empty = tmp_path / "cut", tmp_path / "empty"
    for copy in (cut, empty):
        shutil.copytree(project, copy)
    projector = cut / "projector.safetensors"
    projector.write_bytes(projector.read_bytes()[: projector.stat().st_size // 2])
    (empty / "language_model" / "model.safetensors").write_bytes(b"")
    cases = {
        f"--image {saved_models} is a folder, not an image file": ["--image", str(saved_models), "--model",
                                                                  str(project)],
        f"--model {picture} is a file, not a model folder": ["--image", str(picture), "--model", str(picture)],
        str(projector): ["--image", str(picture), "--model", str(cut)],
        str(empty / "language_model" / "model.safetensors"): ["--image", str(picture), "--model", str(empty)],
    }
    for expected, args in cases.items():
        result = _chat(*args, "--prompt", "hi")
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(errors) == 1 and expected in errors[0], result.stderr
