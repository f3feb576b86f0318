"""``python -m tools.demo build [--out models/demo] [--work runs/demo] [--quick]`` | ``stages`` | ``probe`` | ``losses``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the demo model from nothing (under 60 min on the 2-core CPU)")
    build.add_argument("--out", type=Path, default=Path("models/demo"), help="final model folder")
    build.add_argument("--work", type=Path, default=Path("runs/demo"), help="data, parts, stages, recipe.json")
    build.add_argument("--example", type=Path, default=None,
                       help="also write a held-out panel here (JPEG) and ask the model its asset code")
    build.add_argument("--quick", action="store_true", help="a tiny smoke run of every step (about a minute)")
    build.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                       help="cores to use (default: all); jobs that run side by side split them")
    rerun = commands.add_parser("stages", help="rerun a build's last part from its work folder: the LM's "
                                "instruction rounds where it does not copy yet, projector distillation, stages 1-2")
    rerun.add_argument("--out", type=Path, default=Path("models/demo"), help="final model folder")
    rerun.add_argument("--work", type=Path, default=Path("runs/demo"), help="the build's work folder")
    rerun.add_argument("--example", type=Path, default=None, help="as for build")
    rerun.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores to use (default: all)")
    probe = commands.add_parser("probe", help="measure which image/patch size keeps the asset code readable")
    probe.add_argument("--out", type=Path, default=Path("runs/demo-probe.json"))
    probe.add_argument("--steps", type=int, default=250)
    losses = commands.add_parser("losses", help="measure which contrastive loss (CLIP softmax, SigLIP sigmoid) "
                                 "teaches the tower to read faster")
    losses.add_argument("--out", type=Path, default=Path("runs/demo-losses"), help="folder: tokenizer, losses.json")
    losses.add_argument("--steps", type=int, default=1000, help="tower steps of 32 panels, per loss")
    losses.add_argument("--panels", type=int, default=20000, help="training panels (drawn in memory)")
    args = parser.parse_args(argv)
    for path in (args.out, getattr(args, "work", None)):
        if path is not None and path.exists() and not path.is_dir() and path.suffix != ".json":
            print(f"error: {path} exists and is not a directory", file=sys.stderr)
            return 2
    if args.command == "probe":
        from tools.demo.probe import probe as run_probe

        rows = run_probe(steps=args.steps)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    if args.command == "losses":
        from tools.demo.probe import compare_losses
        from tools.demo.recipe import SPEC

        args.out.mkdir(parents=True, exist_ok=True)
        results = compare_losses(args.out, SPEC, steps=args.steps, n_train=args.panels)
        (args.out / "losses.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out / 'losses.json'}")
        return 0
    import torch

    # The recipe never runs more threads than this in all: OpenMP threads wait for each other at every
    # barrier, so one thread on a core that another process holds stalls every step.
    torch.set_num_threads(args.threads)
    if args.command == "stages":
        if not (args.work / "recipe.json").is_file():
            print(f"error: {args.work} holds no recipe.json of a build", file=sys.stderr)
            return 2
        from tools.demo.recipe import stages

        record = stages(args.out, args.work, example=args.example)
    else:
        from tools.demo.recipe import build as run_build

        record = run_build(args.out, args.work, quick=args.quick, example=args.example)
    print(json.dumps(record["metrics"], indent=2))
    print(f"wrote {args.out} in {record['total_seconds'] / 60:.1f} min; recipe in {args.work / 'recipe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
