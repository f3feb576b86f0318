"""``vlm-synth --out DIR --n N --seed S [--size PX] [--workers W]``: write a synthetic inspection dataset.

``python -m vlm.synth`` is the same command.
"""

import sys
from pathlib import Path

from vlm.cli import ArgumentParser, UsageError, fail, set_verbosity
from vlm.synth import write_dataset

# Below this the lamp labels and gauge ticks blur into a few pixels and the ground truth stops being visible.
MIN_SIZE = 128
PROG = "vlm.synth"  # the prefix of its error lines


def main(argv: list[str] | None = None) -> int:
    """The ``vlm-synth`` command; returns the exit status (2: bad input, said in one line on stderr)."""
    parser = ArgumentParser(prog="vlm-synth", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; files in it are overwritten)")
    parser.add_argument("--n", type=int, required=True, help="number of panels")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: same seed, same bytes (default 0)")
    parser.add_argument("--size", type=int, default=336, help=f"image side in pixels (default 336, min {MIN_SIZE})")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes drawing panels; the bytes do not depend on it (default 1)")
    try:
        args = parser.parse_args(argv)
        set_verbosity(args.verbose)
        if args.n < 1:
            raise UsageError(f"--n must be at least 1, got {args.n}")
        if args.size < MIN_SIZE:
            raise UsageError(f"--size must be at least {MIN_SIZE}, got {args.size}")
        if args.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {args.workers}")
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} exists and is not a directory")
        write_dataset(args.out, args.n, args.seed, args.size, workers=args.workers)
    except UsageError as error:
        return fail(error, PROG)
    except OSError as error:
        return fail(f"cannot write {args.out}: {error.strerror or error}", PROG)
    print(f"wrote {args.n} panels to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
