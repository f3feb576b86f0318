"""``vlm-merge ADAPTER_DIR OUT``: fold a stage-2 LoRA adapter into the LM and write a standalone model.

``python -m vlm.merge`` is the same command.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vlm.cli import ArgumentParser, UsageError, fail, set_verbosity


def merge(adapter_dir: str, out_dir: str) -> None:
    from vlm.loading import load_pretrained

    model, processor = load_pretrained(adapter_dir)
    if not hasattr(model.language_model, "merge_and_unload"):
        raise ValueError(f"{adapter_dir} holds no LoRA adapter to merge")
    model.language_model = model.language_model.merge_and_unload()
    model.save_pretrained(out_dir, processor, full=True)


def main(argv: list[str] | None = None) -> int:
    """The ``vlm-merge`` command; returns the exit status (2: bad input, said in one line on stderr)."""
    parser = ArgumentParser(prog="vlm-merge", description=__doc__)
    parser.add_argument("adapter_dir", help="a stage-2 output folder (config.json, projector, adapter/)")
    parser.add_argument("out", help="where to write the merged model")
    try:
        args = parser.parse_args(argv)
        set_verbosity(args.verbose)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise UsageError(f"OUT {args.out} exists and is not a folder")
    except UsageError as error:
        return fail(error)
    from vlm.loading import LOAD_ERRORS

    try:
        merge(args.adapter_dir, args.out)
    except LOAD_ERRORS as error:
        return fail(error)
    print(f"wrote merged model {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
