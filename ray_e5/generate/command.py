"""`ray-e5 generate`: synthetic training examples on Ray Data (the paper's two-step prompting)."""

from __future__ import annotations


def register(subparsers) -> None:
    from ray_e5.cliargs import add_config_arguments

    parser = subparsers.add_parser(
        "generate", help="LLM-written training examples (the paper's two-step prompting)",
        description="Writes Parquet shards and manifest.json under <run_dir>/synthetic. Rerunning into the same run "
                    "directory continues a killed run: no duplicate rows, no repeated request for written work.")
    add_config_arguments(parser)
    parser.add_argument("--num-examples", type=int, help="shorthand for --set generate.num_examples=N")
    parser.add_argument("--status", action="store_true",
                        help="print the Batch API batches recorded in the run directory (generate.batch_api), their "
                             "state and counts, and exit without submitting anything")
    parser.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO", default=None,
                        help="then upload the synthetic Parquet shards and the dataset card (synthetic/README.md) to "
                             "this Hugging Face dataset repo, created when absent; token from HF_TOKEN or "
                             "`huggingface-cli login`")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.set_defaults(func=_generate)


def _generate(args) -> int:
    import json

    from ray_e5.cliargs import config_from_args
    from ray_e5.generate.run import generate

    if args.num_examples is not None:
        args.overrides.append(f"generate.num_examples={args.num_examples}")
    if args.status:
        from ray_e5.generate.batch_api import status

        status(config_from_args(args))
        return 0
    result = generate(config_from_args(args))
    manifest = result.manifest
    keys = ("examples", "written_this_run", "by_kind", "drops_this_run", "consistency", "tokens_this_run",
            "cost_usd", "wall_seconds_this_run")
    print(json.dumps({k: manifest.get(k) for k in keys}))
    if args.push_to_hub:
        from ray_e5.generate.card import push_synthetic

        url = push_synthetic(result.uri, args.push_to_hub, private=args.private or None)
        print(f"[ray-e5 generate] synthetic shards and dataset card uploaded to {url}")
    return 0
