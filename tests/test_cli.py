"""What every command shares (vlm/cli.py): quiet unless --verbose, one-line errors and exit 2."""

import importlib
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image
from transformers.utils import logging as hf_logging

import vlm.chat
from vlm import cli

ROOT = Path(__file__).resolve().parents[1]
BAD = "--no-such-flag"
# Each command's module (its entry point is the module's main), its required arguments, one flag it does not
# know, and the start of its error lines.
COMMANDS = {
    "vlm-chat": ("vlm.chat", ["--image", "x.png", BAD], "error: "),
    "vlm-report": ("vlm.report.__main__", [BAD], "error: "),
    "vlm-zeroshot": ("vlm.zeroshot", ["--image", "x.png", "--labels", "a", "b", BAD],
                     "vlm.zeroshot: error: "),
    "vlm-synth": ("vlm.synth.__main__", ["--out", "x", "--n", "1", BAD], "vlm.synth: error: "),
    "vlm-data": ("vlm.data.__main__", ["check", "--config", "x.yaml", BAD], "error: "),
    "vlm-merge": ("vlm.merge", ["a", "b", BAD], "error: "),
    "vlm-export": ("vlm.export", ["a", "b", BAD], "error: "),
    "vlm-convert": ("vlm.convert", ["a", "b", BAD], "error: "),
    "python -m vlm.testing": ("vlm.testing", [BAD], "error: "),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_a_bad_flag_is_one_line_and_exit_2_and_verbose_is_known(name, capsys, tmp_path, monkeypatch):
    module, argv, prefix = COMMANDS[name]
    main = importlib.import_module(module).main
    monkeypatch.chdir(tmp_path)  # nothing a command might write lands in the checkout
    assert main(["--verbose", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"{prefix}unrecognized arguments: {BAD}\n"
    assert not any(tmp_path.iterdir())


def test_fail_keeps_a_multi_line_message_on_one_line(capsys):
    assert cli.fail("cannot load model m:\n  config.json is missing\n", "vlm.x") == 2
    assert capsys.readouterr().err == "vlm.x: error: cannot load model m: config.json is missing\n"


def test_the_default_model_resolves_from_the_checkout_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert vlm.chat.parse_args(["--image", "x.png"]).model == str(ROOT / "models" / "demo")


def test_an_entry_point_without_a_model_folder_says_so_in_one_line(tmp_path, monkeypatch, capsys,
                                                                   restore_library_state):
    # An installed (not editable) package has no models/ beside it: the default points nowhere.
    Image.new("RGB", (20, 20)).save(tmp_path / "panel.png")
    missing = tmp_path / "site-packages" / "models" / "demo"
    monkeypatch.setattr(vlm.chat, "DEMO_MODEL", missing)
    assert vlm.chat.main(["--image", str(tmp_path / "panel.png"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == (f"error: no model at {missing} (build it in the checkout with "
                                       "`python -m tools.demo build`, or pass --model)\n")


@pytest.fixture
def restore_library_state(monkeypatch):
    """set_verbosity changes process-wide switches: put them back for the tests that follow."""
    for name in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS",
                 "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    names = (*cli.LIBRARY_LOGGERS, cli.BITSANDBYTES_KERNEL_LOGGER)
    levels = {name: logging.getLogger(name).level for name in names}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def test_quiet_turns_off_the_loaded_libraries_bars_and_warnings(restore_library_state):
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    cli.set_verbosity(True)
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == logging.WARNING
    cli.set_verbosity(False)
    assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == logging.ERROR
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR
    assert not logging.getLogger("kernels").isEnabledFor(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("going away", FutureWarning, stacklevel=1)
    assert caught == []


def test_verbose_shows_the_bitsandbytes_kernel_line_that_vlm_hides(restore_library_state):
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)  # a fresh process's
    logging.getLogger(cli.BITSANDBYTES_KERNEL_LOGGER).setLevel(logging.ERROR)  # as vlm/__init__ leaves it
    cli.set_verbosity(True)
    assert logging.getLogger(cli.BITSANDBYTES_KERNEL_LOGGER).isEnabledFor(logging.WARNING)


def test_chat_is_quiet_by_default_and_verbose_shows_the_loading_bars(tiny_model, tmp_path):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "model", processor)
    Image.new("RGB", (60, 40), (30, 140, 60)).save(tmp_path / "panel.png")
    argv = [sys.executable, str(ROOT / "chat.py"), "--image", str(tmp_path / "panel.png"), "--model",
            str(tmp_path / "model"), "--max-new-tokens", "2"]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    runs = {flags: subprocess.run([*argv, *flags], input="hi\n", capture_output=True, text=True, timeout=120,
                                  env=env, cwd=tmp_path) for flags in ((), ("--verbose",))}
    for result in runs.values():
        assert result.returncode == 0 and result.stdout.startswith("vlm> "), result.stderr
    assert runs[()].stderr == ""
    assert "Loading weights" in runs[("--verbose",)].stderr
