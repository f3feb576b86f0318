"""What every command shares: one-line usage errors, and quiet output unless ``--verbose``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


class UsageError(Exception):
    """A bad command line, said in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line) instead of printing its usage and exiting."""

    def __init__(self, *args, verbose_flag: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if verbose_flag:
            self.add_argument("--verbose", action="store_true",
                              help="show the libraries' loading bars, warnings and info logs")

    def error(self, message: str):
        raise UsageError(message)


def set_verbosity(verbose: bool) -> None:
    """Quiet by default: no weight-loading bars, library warnings or info logs; our own progress bars stay."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|accelerate|torch)\b")
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # it read the environment at import; its own switches decide now
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
