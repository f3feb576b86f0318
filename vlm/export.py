"""``python -m vlm.export SRC OUT``: write a Hugging Face Llava folder from a project model."""

from __future__ import annotations

import argparse
import sys

from vlm.hf_llava import ExportError, export_llava
from vlm.loading import load_pretrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", help="a project model folder or hub id")
    parser.add_argument("out", help="the Llava folder to write")
    args = parser.parse_args(argv)
    try:
        model, processor = load_pretrained(args.src)
        out = export_llava(model, processor, args.out)
    except (ExportError, OSError, ValueError) as error:  # ModelFolderError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote Hugging Face Llava folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
