"""`ray-e5 train`: contrastive LoRA fine-tuning on Ray Train, configured by the `train:` section."""

from __future__ import annotations


def register(subparsers) -> None:
    from ray_e5.cliargs import add_config_arguments

    parser = subparsers.add_parser(
        "train", help="fine-tune a decoder into an embedder (LoRA + InfoNCE) on Ray Train",
        description="Train on <run_dir>/synthetic and the labeled train.sources; writes <run_dir>/embedder, "
                    "<run_dir>/train/metrics.jsonl and loss.png. Re-running resumes from the last checkpoint.")
    add_config_arguments(parser)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (train.max_steps)")
    parser.add_argument("--max-time", type=float, metavar="SECONDS",
                        help="stop cleanly after this much wall time, keeping what is trained (train.max_time_s)")
    parser.set_defaults(func=_train)


def _train(args) -> int:
    from ray_e5.cliargs import config_from_args
    from ray_e5.train.run import train

    if args.max_steps is not None:
        args.overrides.append(f"train.max_steps={args.max_steps}")
    if args.max_time is not None:
        args.overrides.append(f"train.max_time_s={args.max_time}")
    print(train(config_from_args(args)).local_dir)
    return 0
