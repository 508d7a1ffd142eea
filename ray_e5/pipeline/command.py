"""`ray-e5 quickstart` (offline, one machine, a time budget) and `ray-e5 pipeline` (all stages, one run dir)."""

from __future__ import annotations

import argparse

from ray_e5.cliargs import SET_HELP, add_config_arguments
from ray_e5.stages import STAGES

ALLOW_EMPTY_HELP = ("when generation writes no valid row, print one warning and train on the labeled sources alone "
                    "(default: stop after generation with its message)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-serving", action="store_true", help="keep the server up until Ctrl-C")
    parser.add_argument("--allow-empty-synthetic", action="store_true", help=ALLOW_EMPTY_HELP)
    # also accepted after the subcommand; SUPPRESS keeps a global `ray-e5 --verbose` from being reset
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show Ray's and the libraries' internal log lines and warnings")


def register(subparsers) -> None:
    quick = subparsers.add_parser(
        "quickstart", help="the whole recipe offline on this machine: generate, train, evaluate, serve",
        description="Gemma 3 270M writes synthetic data (llama.cpp; in process for cpu-1h), a Gemma 270M LoRA embedder is trained on it "
                    "(plus the labeled datasets the recipe names: from the mirror under --data-dir when present, "
                    "else the Hugging Face Hub), base and trained models are scored, and the trained one is served "
                    "behind /v1/embeddings. A dataset found in neither place stops it before anything starts. A "
                    "rerun into the same run directory resumes.")
    quick.add_argument("--config", metavar="NAME|FILE",
                       help="a packaged recipe (`ray-e5 recipes`) or a YAML file (default: cpu-1h for a budget of "
                            "60 min or more, else quickstart)")
    quick.add_argument("--run-dir", help="where outputs go (default: the recipe's run_dir, runs/quickstart)")
    quick.add_argument("--data-dir", default=None,
                       help="a local mirror of the recipe's datasets: sets data_dir (default: the recipe's data_dir, "
                            "../shared/data); a dataset absent there is read from the Hugging Face Hub")
    quick.add_argument("--budget-min", type=float, default=20.0, help="time budget in minutes (default 20)")
    quick.add_argument("--smoke", action="store_true",
                       help="reduced size (2 examples, 30 steps, small eval sets): the CI end-to-end run")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help=SET_HELP)
    _common(quick)
    quick.set_defaults(func=_quickstart)

    pipe = subparsers.add_parser("pipeline", help="run all stages (or --stages) on one run directory",
                                 description="Runs " + " -> ".join(STAGES) + " on one run directory; the whole "
                                             "config is validated first.")
    add_config_arguments(pipe)
    pipe.add_argument("--stages", default=",".join(STAGES),
                      help=f"comma-separated subset of {','.join(STAGES)} (default: all; run in that order)")
    _common(pipe)
    pipe.set_defaults(func=_pipeline)


def _verbose(args) -> None:
    if getattr(args, "verbose", False):
        import os

        from ray_e5.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"


def _quickstart(args) -> int:
    import os

    _verbose(args)
    from ray_e5.datasets import lookups
    from ray_e5.pipeline.quickstart import Budget, quickstart_config, run_quickstart

    config = quickstart_config(args.config, args.run_dir, args.data_dir, Budget(args.budget_min * 60), args.smoke,
                               args.overrides)
    if all(found.found == "mirror" for found in lookups(config, ask_hub=False)):
        # the packaged models and the mirror need no Hub: nothing asks it (unless the user says otherwise)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    run_quickstart(config, keep_serving=args.keep_serving, allow_empty_synthetic=args.allow_empty_synthetic)
    return 0


def _pipeline(args) -> int:
    from ray_e5.cliargs import config_from_args
    from ray_e5.cluster import wait_forever
    from ray_e5.pipeline.run import run_pipeline
    from ray_e5.stages import select

    _verbose(args)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    select(stages)  # an unknown stage name fails before the config is read
    results = run_pipeline(config_from_args(args), stages, allow_empty_synthetic=args.allow_empty_synthetic)
    if "serve" in results:
        print(f"[ray-e5] serving {results['serve'].model_name} at {results['serve'].url}")
        if args.keep_serving:
            wait_forever()
    return 0
