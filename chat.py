"""Chat about an image: ``python chat.py --image panel.jpg [--prompt "What is the asset code?"]``.

Without ``--prompt`` it opens a multi-turn chat on stdin (an empty line or ``exit`` ends it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="the picture to talk about")
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="a project model folder, a hub id, or a Hugging Face Llava folder")
    parser.add_argument("--prompt", help="answer this once and exit")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    parser.add_argument("--load-4bit", action="store_true", help="load the LM in 4 bits (bitsandbytes)")
    parser.add_argument("--report", action="store_true",
                        help="print the image's inspection report as schema-valid JSON and exit (vlm.report)")
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from safetensors import SafetensorError  # heavy imports after argument errors are reported

    from vlm.images import ImageError, load_image
    from vlm.loading import load_pretrained
    from vlm.session import ChatSession

    if Path(args.image).is_dir():
        return _fail(f"--image {args.image} is a folder, not an image file")
    if Path(args.model).is_file():
        return _fail(f"--model {args.model} is a file, not a model folder")
    try:
        image = load_image(args.image)
    except ImageError as error:
        return _fail(str(error))
    try:
        model, processor = load_pretrained(args.model, load_in_4bit=args.load_4bit, device=args.device,
                                           dtype=args.dtype)
    except (FileNotFoundError, ValueError, OSError, SafetensorError) as error:  # ModelFolderError: a ValueError
        return _fail(f"cannot load model {args.model}: {' '.join(str(error).split())}")
    if args.report:
        from vlm.report import ReportError, generate_report

        try:
            print(json.dumps(generate_report(model, processor, image, temperature=args.temperature), indent=2))
        except ReportError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
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
