"""``vlm-convert SRC OUT [--llava LLAVA_OUT]``: an original LLaVA (or any loadable) model as a project folder.

Writes the project's own self-contained folder (tower, LM, tokenizer, projector) and, with ``--llava``, the
Hugging Face Llava folder too, so neither needs the original layout or its pickles again.
``python -m vlm.convert`` is the same command.
"""

from __future__ import annotations

import sys

from vlm.cli import ArgumentParser, UsageError, fail, set_verbosity


def main(argv: list[str] | None = None) -> int:
    """The ``vlm-convert`` command; returns the exit status (2: bad input, said in one line on stderr)."""
    parser = ArgumentParser(prog="vlm-convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="an original LLaVA folder (haotian-liu/LLaVA layout) or any model load_pretrained "
                                    "reads")
    parser.add_argument("out", help="the project folder to write")
    parser.add_argument("--llava", metavar="LLAVA_OUT", help="also write a Hugging Face Llava folder here")
    parser.add_argument("--dtype", help="convert the weights to this dtype (default: the checkpoint's)")
    try:
        args = parser.parse_args(argv)
        set_verbosity(args.verbose)
    except UsageError as error:
        return fail(error)
    from vlm.hf_llava import ExportError, export_llava
    from vlm.loading import LOAD_ERRORS, load_pretrained

    try:
        model, processor = load_pretrained(args.src, dtype=args.dtype)
        model.save_pretrained(args.out, processor, full=True)
        print(f"wrote project folder {args.out}")
        if args.llava:
            print(f"wrote Hugging Face Llava folder {export_llava(model, processor, args.llava)}")
    except (ExportError, *LOAD_ERRORS) as error:
        return fail(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
