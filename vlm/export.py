"""``vlm-export SRC OUT``: write a Hugging Face Llava folder from a project model.

``python -m vlm.export`` is the same command.
"""

from __future__ import annotations

import sys

from vlm.cli import ArgumentParser, UsageError, fail, set_verbosity


def main(argv: list[str] | None = None) -> int:
    """The ``vlm-export`` command; returns the exit status (2: bad input, said in one line on stderr)."""
    parser = ArgumentParser(prog="vlm-export", description=__doc__)
    parser.add_argument("src", help="a project model folder or hub id")
    parser.add_argument("out", help="the Llava folder to write")
    try:
        args = parser.parse_args(argv)
        set_verbosity(args.verbose)
    except UsageError as error:
        return fail(error)
    from vlm.hf_llava import ExportError, export_llava
    from vlm.loading import LOAD_ERRORS, load_pretrained

    try:
        model, processor = load_pretrained(args.src)
        out = export_llava(model, processor, args.out)
    except (ExportError, *LOAD_ERRORS) as error:
        return fail(error)
    print(f"wrote Hugging Face Llava folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
