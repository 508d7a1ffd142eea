"""`ray-e5 generate`: synthetic training examples on Ray Data."""

from __future__ import annotations


def register(subparsers) -> None:
    from ray_e5.cli import add_config_arguments

    parser = subparsers.add_parser("generate", help="LLM-written training examples (the paper's two-step prompting)",
                                   description="Writes Parquet shards and manifest.json under <run_dir>/synthetic; "
                                               "a rerun continues a killed run.")
    add_config_arguments(parser)
    parser.add_argument("--num-examples", type=int, help="generate.num_examples")
    parser.set_defaults(func=_generate)


def _generate(args) -> int:
    import json

    from ray_e5.cli import config_from_args
    from ray_e5.synth.run import generate

    if args.num_examples:
        args.overrides.append(f"generate.num_examples={args.num_examples}")
    manifest = generate(config_from_args(args))
    print(json.dumps({k: manifest[k] for k in ("examples", "by_kind", "drops_this_run", "tokens", "cost_usd")}))
    return 0
