"""Train a stage: ``accelerate launch train_projector.py --config configs/X.yaml [key=value ...]``.

``stage: align`` trains the projector on image-caption pairs; ``stage: instruct`` trains LoRA on the LM
plus the projector. Plain ``python train_projector.py ...`` runs on one process. An output folder belongs
to one run: ``resume=true`` continues it (same settings and data), ``overwrite=true`` starts afresh.
"""

from __future__ import annotations

import argparse
import sys

from vlm.config import load_config
from vlm.data.formats import DataError
from vlm.images import ImageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=2e-4 stage=instruct")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        from vlm.train.loop import train  # after the config is known good: importing torch takes seconds

        train(config)
    except (DataError, ImageError, OSError, ValueError) as error:  # OSError: a file or folder the user named
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
