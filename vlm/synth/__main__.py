"""``python -m vlm.synth --out DIR --n N --seed S [--size PX] [--workers W]``: write a synthetic inspection dataset."""

import argparse
import sys
from pathlib import Path

from vlm.synth import write_dataset

# Below this the lamp labels and gauge ticks blur into a few pixels and the ground truth stops being visible.
MIN_SIZE = 128


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        raise _UsageError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m vlm.synth", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; files in it are overwritten)")
    parser.add_argument("--n", type=int, required=True, help="number of panels")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: same seed, same bytes (default 0)")
    parser.add_argument("--size", type=int, default=336, help=f"image side in pixels (default 336, min {MIN_SIZE})")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes drawing panels; the bytes do not depend on it (default 1)")
    try:
        args = parser.parse_args(argv)
        if args.n < 1:
            raise _UsageError(f"--n must be at least 1, got {args.n}")
        if args.size < MIN_SIZE:
            raise _UsageError(f"--size must be at least {MIN_SIZE}, got {args.size}")
        if args.workers < 1:
            raise _UsageError(f"--workers must be at least 1, got {args.workers}")
        if args.out.exists() and not args.out.is_dir():
            raise _UsageError(f"--out {args.out} exists and is not a directory")
        write_dataset(args.out, args.n, args.seed, args.size, workers=args.workers)
    except _UsageError as e:
        print(f"vlm.synth: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"vlm.synth: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} panels to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
