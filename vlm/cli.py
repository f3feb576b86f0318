"""What every command shares: one-line errors, quiet output unless ``--verbose``, where the demo model is."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

# The checkout's demo model: the default of chat, report and zeroshot. An installed copy of the package
# (not an editable one) has no models/ beside it, and says so in one line (require_model_folder).
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"
# Loggers of the libraries a command drives; quiet means errors only.
LIBRARY_LOGGERS = ("transformers", "peft", "accelerate", "bitsandbytes", "kernels", "huggingface_hub",
                   "datasets", "torch")
# vlm/__init__ hides this one for library users too (an optional hub kernel missing on AVX512-BF16 CPUs).
BITSANDBYTES_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


class UsageError(Exception):
    """A bad command line, said in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line) instead of printing its usage and exiting."""

    def __init__(self, *args, verbose_flag: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if verbose_flag:
            self.add_argument("--verbose", action="store_true",
                              help="show the libraries' loading bars, warnings and logs (hidden by default)")

    def error(self, message: str):
        raise UsageError(message)


def one_line(message: object) -> str:
    """An error's text on one line: a library's multi-line message joined, so the report stays one line."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(message: object, prog: str | None = None) -> int:
    """Say ``[prog: ]error: message`` on stderr in one line; returns 2, the exit status of bad input."""
    print(f"{prog + ': ' if prog else ''}error: {one_line(message)}", file=sys.stderr)
    return 2


def require_model_folder(name: str | Path, default: Path = DEMO_MODEL, flag: str = "--model") -> None:
    """One line for what a loader would say badly: the default model not built (or not installed), a file."""
    if Path(name) == default and not (default / "config.json").is_file():
        raise UsageError(f"no model at {default} (build it in the checkout with `python -m tools.demo build`,"
                         f" or pass {flag})")
    if Path(name).is_file():
        raise UsageError(f"{flag} {name} is a file, not a model folder")


def set_verbosity(verbose: bool) -> None:
    """Quiet by default: no weight-loading bars, library warnings or logs; the commands' own bars stay.

    Works before and after the libraries are imported: the environment is read at their import, their own
    switches are flipped where they are loaded already (``import vlm`` loads transformers and peft).
    """
    if verbose:
        logging.getLogger(BITSANDBYTES_KERNEL_LOGGER).setLevel(logging.NOTSET)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(transformers|peft|accelerate|torch|bitsandbytes|kernels|datasets)\b")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:  # its "Loading weights" bar goes through this switch, not the hub's
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
