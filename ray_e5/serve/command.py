"""`ray-e5 serve`: the OpenAI-compatible embeddings API on Ray Serve."""

from __future__ import annotations


def register(subparsers) -> None:
    from ray_e5.cliargs import add_config_arguments

    parser = subparsers.add_parser("serve", help="serve an embedder behind an OpenAI-compatible /v1/embeddings")
    add_config_arguments(parser)
    parser.add_argument("--model", help="embedder dir, merged model dir or packaged name (serve.model)")
    parser.add_argument("--port", type=int, help="HTTP port (serve.port)")
    parser.set_defaults(func=_serve)


def _serve(args) -> int:
    from ray_e5.cliargs import config_from_args
    from ray_e5.serve.run import serve

    if args.model:
        args.overrides.append(f"serve.model={args.model}")
    if args.port:
        args.overrides.append(f"serve.port={args.port}")
    serve(config_from_args(args), blocking=True)
    return 0
