"""Train a stage: ``vlm-train --config configs/X.yaml [key=value ...]`` (or ``python train_projector.py``).

``stage: align`` trains the projector on image-caption pairs; ``stage: instruct`` trains LoRA on the LM
plus the projector. Under ``accelerate launch train_projector.py ...`` it runs on every process. An output
folder belongs to one run: ``resume=true`` continues it (same settings and data), ``overwrite=true`` starts
afresh. Quiet by default (its own progress bar and tables only); ``--verbose`` shows the libraries' output.
"""

from __future__ import annotations

import argparse
import sys

from vlm.cli import ArgumentParser, UsageError, fail, set_verbosity
from vlm.config import load_config
from vlm.data.formats import DataError
from vlm.images import ImageError


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 trained, 2 a bad command line, config, data set or output folder (one line on stderr)."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=2e-4 stage=instruct")
    try:
        args = parser.parse_args(argv)
        set_verbosity(args.verbose)
        config = load_config(args.config, args.overrides)
        from vlm.train.loop import train  # after the config is known good: the training stack takes seconds

        train(config)
    except (UsageError, DataError, ImageError, OSError, ValueError) as error:  # OSError: a path the user named
        return fail(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
