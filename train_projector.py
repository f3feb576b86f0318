"""``python train_projector.py --config configs/X.yaml [key=value ...]``: ``vlm-train`` from a checkout.

Kept for ``accelerate launch train_projector.py ...``, which launches a script; the command is
:mod:`vlm.train.cli`.
"""

import sys

from vlm.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
