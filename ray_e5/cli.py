"""`ray-e5` command line: embed, export, validate, and one subcommand per stage.

The stage subcommands come from the stage registry (:mod:`ray_e5.stages`): each registered stage's package has a
``command.py`` whose ``register(subparsers)`` adds the subcommand named as the stage and sets ``func`` on it, so
each stage's CLI lives beside its code; ``pipeline`` and ``quickstart`` come from ``ray_e5/pipeline/command.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from ray_e5.cliargs import add_config_arguments, config_from_args  # noqa: F401  (the shared config arguments)
from ray_e5.stages import STAGES

COMMAND_MODULES = (*(stage.command_module for stage in STAGES.values()), "ray_e5.pipeline.command",
                   "ray_e5.recipes.command")


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


def _validate(args) -> int:
    """Exit 0 printing ``ok``, or exit 2 printing every error of every section (one per line)."""
    from ray_e5.settings import ConfigError

    try:
        config_from_args(args)
    except ConfigError as err:
        for line in err.errors:
            print(line)
        return 2
    print("ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-e5", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's and the libraries' internal log lines and warnings (kept in Ray's log "
                             "files otherwise)")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("validate", help="check the whole config (every section) without running anything",
                           description="Prints ok (exit 0), or every error with its dotted key (exit 2).")
    add_config_arguments(check)
    check.set_defaults(func=_validate)

    embed = sub.add_parser("embed", help="embed texts and print vectors (or their cosine matrix) as JSON")
    embed.add_argument("--model", default="gemma3-270m",
                       help="packaged name (gemma3-270m, minilm-l6), embedder dir, model dir, .gguf file or HF id")
    embed.add_argument("--instruction", help="task instruction: embeds the texts as queries with the E5 template")
    embed.add_argument("--pooling", choices=["last", "mean", "cls"], help="override the model's pooling")
    embed.add_argument("--similarity", action="store_true", help="print the cosine similarity matrix instead")
    embed.add_argument("texts", nargs="+")
    embed.set_defaults(func=_embed)

    export = sub.add_parser("export", help="merge an embedder's LoRA into a sentence-transformers model directory")
    export.add_argument("embedder", help="embedder directory, its URI (s3://.../embedder, gs://...) or any model "
                        "reference")
    export.add_argument("--output", "-o", required=True)
    export.set_defaults(func=_export)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _loaded_error_types() -> tuple[type, ...]:
    """UnknownModelError, when its module is loaded (raising one loads it): importing it up front would load torch
    for every command, `ray-e5 validate` included."""
    sources = sys.modules.get("ray_e5.model.sources")
    return (sources.UnknownModelError,) if sources is not None else ()


def job_main(command: str) -> int:
    """``main`` for the ``jobs/<stage>.py`` entry points of `ray job submit`.

    torch's libraries are loaded first: loaded late, after pyarrow's S3 client and Ray Data, libtorch_cpu.so failed
    to load in a job driver on an s3:// run dir (oneMKL FATAL ERROR, exit 2)."""
    try:
        import torch  # noqa: F401
    except ImportError:  # a driver without torch (generation only) has nothing to load
        pass
    return main([command, *sys.argv[1:]], console=True)


def main(argv: list[str] | None = None, console: bool | None = None) -> int:
    """The CLI. ``console`` (default: when the arguments come from the command line) marks a process whose
    console is ours: Ray's known native noise is then kept off its stderr (:mod:`ray_e5.native_stderr`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    from ray_e5.cluster import VERBOSE_ENV, verbose

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    if not verbose() and (argv is None if console is None else console):
        from ray_e5.native_stderr import filter_native_stderr

        filter_native_stderr()
    from ray_e5.capacity import CapacityError
    from ray_e5.cluster import ClusterUnreachable
    from ray_e5.settings import ConfigError
    from ray_e5.stages import UnknownStageError

    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if not isinstance(err, (ConfigError, UnknownStageError, CapacityError, ClusterUnreachable,
                                *_loaded_error_types())):
            raise
        print(f"ray-e5 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nray-e5 {args.command}: interrupted; what was written stays in the run directory and a rerun "
              "resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
