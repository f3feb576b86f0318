"""``vlm-data check --config CONFIG [--workers N] [--decode] [key=value ...]``: the preflight report of a
training config (images by their headers unless ``--decode``; training skips a body that fails later).
``python -m vlm.data`` is the same command; exit status 1 when training would refuse the data."""

from __future__ import annotations

import sys

from vlm.cli import ArgumentParser, UsageError, fail, set_verbosity
from vlm.config import load_config


def main(argv: list[str] | None = None) -> int:
    """The ``vlm-data`` command; returns the exit status (2: bad input, 1: data training would refuse)."""
    parser = ArgumentParser(prog="vlm-data", description=__doc__)
    parser.add_argument("command", choices=["check"])
    parser.add_argument("--config", required=True, help="a training YAML (its model and data sections are used)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: every core, for large data)")
    parser.add_argument("--decode", action="store_true", help="decode every image fully (~100x slower than headers)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. data.path=other.json")
    try:
        args = parser.parse_intermixed_args(argv)  # the command, --config and overrides in any order
        set_verbosity(args.verbose)
        if args.workers is not None and args.workers < 1:
            raise UsageError(f"--workers={args.workers} must be at least 1")
    except UsageError as error:
        return fail(error)
    from vlm.data.formats import DataError, load_records
    from vlm.data.preflight import check_records, enforce
    from vlm.loading import build_vlm, load_pretrained

    try:
        config = load_config(args.config, args.overrides)
        if not config.data.path:
            raise ValueError("data.path is not set")
        records = load_records(config.data.path, image_column=config.data.image_column)
        # The processor decides the token counts; building the model is how it is known exactly.
        _, processor = load_pretrained(config.init_from) if config.init_from else build_vlm(config.model)
        report = check_records(records, processor, config.data, workers=args.workers, decode=args.decode)
    except (DataError, FileNotFoundError, ValueError, OSError) as error:
        return fail(error)
    print(report.format())
    try:  # the verdict training would give
        enforce(report, config.data.max_bad_fraction, None, config.data.on_too_long)
    except DataError as error:
        fail(error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
