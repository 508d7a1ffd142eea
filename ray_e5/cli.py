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


#: `ray-e5 embed` flag -> its key in the embed: section (the corpus mode: --input ... --output ...)
EMBED_FLAGS = {"input": "input", "output": "output", "model": "model", "text_column": "text_column",
               "id_column": "id_column", "dimensions": "dimensions", "instruction": "instruction",
               "pooling": "pooling", "num_gpus": "num_gpus", "engine": "engine", "max_actors": "max_actors",
               "batch_tokens": "batch_tokens", "input_format": "format", "dtype": "dtype"}


def _embed(args) -> int:
    """``ray-e5 embed TEXT...`` prints vectors; with --input (or embed.input in the config) it embeds a corpus."""
    from ray_e5.settings import ConfigError

    if args.texts and args.input is None:
        return _embed_texts(args)
    config = config_from_args(args)
    for flag, key in EMBED_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(config.embed, key, value)  # validated on assignment: a bad value names embed.<key>
    if args.texts:
        raise ConfigError("ray-e5 embed: give texts or --input, not both")
    if not config.embed.input:
        raise ConfigError("ray-e5 embed: give texts to embed, or --input URI --output URI (embed.input, "
                           "embed.output) to embed a corpus")
    from ray_e5.embed.run import embed_corpus

    embed_corpus(config)
    return 0


def _embed_texts(args) -> int:
    import numpy as np

    from ray_e5.model import Embedder

    embedder = Embedder.load(args.model or "gemma3-270m", **({"pooling": args.pooling} if args.pooling else {}))
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

    out = export_sentence_transformers(args.embedder, args.output, model_id=args.push_to_hub, run_dir=args.run_dir)
    print(f"merged sentence-transformers model and its card (README.md) written to {out}")
    if args.push_to_hub:
        from ray_e5.hub import push_folder

        url = push_folder(out, args.push_to_hub, repo_type="model", private=args.private or None)
        print(f"uploaded to {url}")
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

    embed = sub.add_parser(
        "embed", help="embed texts and print vectors as JSON; or, with --input/--output, a whole corpus to Parquet",
        description="`ray-e5 embed TEXT...` prints vectors (or their cosine matrix) as JSON. `ray-e5 embed --input "
        "URI --output URI` embeds a Parquet or JSONL corpus (local, s3://, gs://) with an autoscaling pool of Ray "
        "Data actors into Parquet shards of id, embedding; a rerun into the same output resumes. Every flag has its "
        "key in the config's embed: section (docs/embed.md).")
    embed.add_argument("--model", default=None,
                       help="packaged name (gemma3-270m, minilm-l6), embedder dir or URI, model dir, .gguf file or "
                       "HF id (default gemma3-270m; a corpus: embed.model, else model.name)")
    embed.add_argument("--instruction", help="task instruction: embeds the texts as queries with the E5 template")
    embed.add_argument("--pooling", choices=["last", "mean", "cls"], help="override the model's pooling")
    embed.add_argument("--similarity", action="store_true", help="print the cosine similarity matrix instead")
    embed.add_argument("--input", metavar="URI", help="corpus: a Parquet or JSONL file or folder (local, s3://, gs://)")
    embed.add_argument("--output", metavar="URI", help="corpus: the folder the Parquet shards go to")
    embed.add_argument("--text-column", dest="text_column", metavar="C", help="corpus: the text column (default text)")
    embed.add_argument("--id-column", dest="id_column", metavar="C", help="corpus: the id column (default id)")
    embed.add_argument("--dimensions", type=int, metavar="N",
                       help="corpus: keep the first N coordinates, re-normalised (Matryoshka)")
    embed.add_argument("--num-gpus", dest="num_gpus", type=float, metavar="G",
                       help="corpus: GPUs per actor (bf16 weights, float32 pooling)")
    embed.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                       help="corpus: the weights' dtype (default auto: bf16 where the node runs it natively, else fp32)")
    embed.add_argument("--engine", choices=["embedder", "vllm"],
                       help="corpus: the Embedder in Ray Data actors, or vLLM through ray.data.llm (a merged export)")
    embed.add_argument("--max-actors", dest="max_actors", type=int, metavar="N",
                       help="corpus: the actor pool scales between 1 and N (default: what the cluster holds)")
    embed.add_argument("--batch-tokens", dest="batch_tokens", type=int, metavar="N",
                       help="corpus: padded tokens per forward")
    embed.add_argument("--input-format", dest="input_format", choices=["auto", "parquet", "jsonl"],
                       help="corpus: the input's format (default: by file suffix)")
    add_config_arguments(embed)
    embed.add_argument("texts", nargs="*")
    embed.set_defaults(func=_embed)

    export = sub.add_parser("export", help="merge an embedder's LoRA into a sentence-transformers model directory")
    export.add_argument("embedder", help="embedder directory, its URI (s3://.../embedder, gs://...) or any model "
                        "reference")
    export.add_argument("--output", "-o", required=True)
    export.add_argument("--run-dir", dest="run_dir", default=None,
                        help="the run whose eval/report.json and train/ records the model card reports (default: "
                        "the embedder's own run when it is <run_dir>/embedder)")
    export.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO", default=None,
                        help="upload the exported folder (weights and README.md) to this Hugging Face model repo, "
                        "created when absent; token from HF_TOKEN or `huggingface-cli login`")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    export.set_defaults(func=_export)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _loaded_error_types() -> tuple[type, ...]:
    """UnknownModelError, when its module is loaded (raising one loads it): importing it up front would load torch
    for every command, `ray-e5 validate` included."""
    references = sys.modules.get("ray_e5.model.references")
    return (references.UnknownModelError,) if references is not None else ()


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
    from ray_e5.console import VERBOSE_ENV, verbose

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
