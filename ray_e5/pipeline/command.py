"""`ray-e5 quickstart` (offline, one machine, a time budget) and `ray-e5 pipeline` (all stages, one run dir)."""

from __future__ import annotations

from ray_e5.pipeline.run import STAGES


def register(subparsers) -> None:
    from ray_e5.cli import add_config_arguments

    quick = subparsers.add_parser(
        "quickstart", help="the whole recipe offline on this machine: generate, train, evaluate, serve",
        description="Gemma 3 270M writes synthetic data (llama.cpp), a Gemma 270M LoRA embedder is trained on it "
                    "(plus ../shared/data when present), base and trained models are scored, and the trained one is "
                    "served behind /v1/embeddings. A rerun into the same run directory resumes.")
    quick.add_argument("--config", help="recipe (default: configs/quickstart.yaml)")
    quick.add_argument("--run-dir", help="where outputs go (default: the recipe's run_dir, runs/quickstart)")
    quick.add_argument("--data-dir", default=None,
                       help="folder of the labeled datasets (default: the recipe's ../shared/data paths)")
    quick.add_argument("--budget-min", type=float, default=20.0, help="time budget in minutes (default 20)")
    quick.add_argument("--smoke", action="store_true",
                       help="reduced size (2 examples, 30 steps, small eval sets): the CI end-to-end run")
    quick.add_argument("--keep-serving", action="store_true", help="keep the server up until Ctrl-C")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    quick.set_defaults(func=_quickstart)

    pipe = subparsers.add_parser("pipeline", help="run all stages (or --stages) on one run directory")
    add_config_arguments(pipe)
    pipe.add_argument("--stages", default=",".join(STAGES),
                      help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    pipe.add_argument("--keep-serving", action="store_true", help="keep the server up until Ctrl-C")
    pipe.set_defaults(func=_pipeline)


def _quickstart(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from ray_e5.pipeline.quickstart import Budget, quickstart_config, run_quickstart

    config = quickstart_config(args.config, args.run_dir, args.data_dir, Budget(args.budget_min * 60), args.smoke,
                               args.overrides)
    run_quickstart(config, keep_serving=args.keep_serving)
    return 0


def _pipeline(args) -> int:
    from ray_e5.cli import config_from_args
    from ray_e5.pipeline.run import run_pipeline, wait_forever

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    results = run_pipeline(config_from_args(args), stages)
    if "serve" in results:
        print(f"[ray-e5] serving at {results['serve']}")
        if args.keep_serving:
            wait_forever()
    return 0
