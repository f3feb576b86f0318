"""``python -m vlm.merge ADAPTER_DIR OUT``: fold a stage-2 LoRA adapter into the LM and write a standalone model."""

from __future__ import annotations

import argparse
import sys

from vlm.loading import load_pretrained


def merge(adapter_dir: str, out_dir: str) -> None:
    model, processor = load_pretrained(adapter_dir)
    if not hasattr(model.language_model, "merge_and_unload"):
        raise ValueError(f"{adapter_dir} holds no LoRA adapter to merge")
    model.language_model = model.language_model.merge_and_unload()
    model.save_pretrained(out_dir, processor, full=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("adapter_dir", help="a stage-2 output folder (config.json, projector, adapter/)")
    parser.add_argument("out", help="where to write the merged model")
    args = parser.parse_args(argv)
    try:
        merge(args.adapter_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote merged model {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
