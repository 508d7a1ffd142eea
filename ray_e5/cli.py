"""`ray-e5` command line: embed, export, and one subcommand per stage.

Stages register their subcommands from ``ray_e5/<stage>/command.py`` (a ``register(subparsers)`` function that
sets ``func`` on its parser), so each stage's CLI lives beside its code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

STAGE_COMMANDS = ("synth", "train", "serve", "eval", "pipeline")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and any number of --set KEY=VALUE overrides (dotted keys)."""
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=2e-4 (repeatable)")
    parser.add_argument("--address", help="Ray cluster address (default: a local cluster)")


def config_from_args(args):
    from ray_e5.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"ray_address={args.address}")
    return load_config(args.config, overrides)


def _embed(args) -> int:
    import numpy as np

    from ray_e5.model import Embedder

    embedder = Embedder.load(args.model, **({"pooling": args.pooling} if args.pooling else {}))
    vectors = embedder.encode(args.texts, instruction=args.instruction)
    if args.similarity:
        matrix = vectors @ vectors.T if embedder.settings.normalize else _cosine(vectors)
        print(json.dumps(np.round(matrix.astype(float), 4).tolist()))
    else:
        print(json.dumps({"model": embedder.name, "dimension": embedder.dimension,
                          "data": [np.round(v.astype(float), 6).tolist() for v in vectors]}))
    return 0


def _cosine(vectors):
    import numpy as np

    unit = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return unit @ unit.T


def _export(args) -> int:
    from ray_e5.model.export import export_sentence_transformers

    out = export_sentence_transformers(args.embedder, args.output)
    print(f"merged sentence-transformers model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-e5", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    embed = sub.add_parser("embed", help="embed texts and print vectors (or their cosine matrix) as JSON")
    embed.add_argument("--model", default="gemma3-270m",
                       help="packaged name (gemma3-270m, minilm-l6), embedder dir, model dir, .gguf file or HF id")
    embed.add_argument("--instruction", help="task instruction: embeds the texts as queries with the E5 template")
    embed.add_argument("--pooling", choices=["last", "mean", "cls"], help="override the model's pooling")
    embed.add_argument("--similarity", action="store_true", help="print the cosine similarity matrix instead")
    embed.add_argument("texts", nargs="+")
    embed.set_defaults(func=_embed)

    export = sub.add_parser("export", help="merge an embedder's LoRA into a sentence-transformers model directory")
    export.add_argument("embedder", help="embedder directory (or any model reference)")
    export.add_argument("--output", "-o", required=True)
    export.set_defaults(func=_export)

    for stage in STAGE_COMMANDS:
        try:
            module = importlib.import_module(f"ray_e5.{stage}.command")
        except ModuleNotFoundError as err:
            if err.name not in (f"ray_e5.{stage}", f"ray_e5.{stage}.command"):
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    from ray_e5.config import ConfigError
    from ray_e5.model.sources import UnknownModelError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, UnknownModelError) as err:
        print(f"ray-e5 {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
