"""Chat about an image: ``vlm-chat --image panel.jpg [--prompt "What is the asset code?"]``.

Without ``--prompt`` it opens a multi-turn chat on stdin (an empty line or ``exit`` ends it).
``python chat.py`` runs the same command from a checkout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm.cli import (
    DEMO_MODEL,
    ArgumentParser,
    UsageError,
    fail,
    one_line,
    require_model_folder,
    set_verbosity,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="vlm-chat", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="the picture to talk about")
    parser.add_argument("--model", default=str(DEMO_MODEL),
                        help="a project model folder, a hub id, or a Hugging Face Llava folder "
                             "(default: the checkout's models/demo)")
    parser.add_argument("--prompt", help="answer this once and exit")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    parser.add_argument("--load-4bit", action="store_true", help="load the LM in 4 bits (bitsandbytes)")
    parser.add_argument("--report", action="store_true",
                        help="print the image's inspection report as schema-valid JSON and exit (vlm.report)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The ``vlm-chat`` command; returns the exit status (2: bad input, said in one line on stderr)."""
    try:
        args = parse_args(argv)
        set_verbosity(args.verbose)
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        if Path(args.image).is_dir():
            raise UsageError(f"--image {args.image} is a folder, not an image file")
        require_model_folder(args.model, DEMO_MODEL)
    except UsageError as error:
        return fail(error)

    from vlm.images import ImageError, load_image
    from vlm.loading import LOAD_ERRORS, load_pretrained
    from vlm.session import ChatSession

    try:
        image = load_image(args.image)
    except ImageError as error:
        return fail(error)
    try:
        model, processor = load_pretrained(args.model, load_in_4bit=args.load_4bit, device=args.device,
                                           dtype=args.dtype)
    except LOAD_ERRORS as error:
        return fail(f"cannot load model {args.model}: {one_line(error)}")
    if args.report:
        from vlm.report import ReportError, generate_report

        try:
            report = generate_report(model, processor, image, temperature=args.temperature)
        except ReportError as error:
            return fail(error)
        print(json.dumps(report, indent=2))
        return 0
    session = ChatSession(model, processor, image, args.max_new_tokens, args.temperature)

    def stream(text: str) -> None:
        print(text, end="", flush=True)

    if args.prompt:
        session.ask(args.prompt, on_text=stream)
        print()
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        question = line.strip()
        if not line or question in ("", "exit", "quit"):
            return 0
        print("vlm> ", end="", flush=True)
        session.ask(question, on_text=stream)
        print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
