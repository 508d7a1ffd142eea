"""The config arguments every config-driven command shares (``--config``, ``--set KEY=VALUE``, ``--address``).

Its own module so that ``ray_e5.cli`` and each ``ray_e5/<stage>/command.py`` import it, and no command module
imports the CLI back.
"""

from __future__ import annotations

import argparse


SET_HELP = ("override a config key, e.g. --set train.lr=2e-4; a number indexes a list: train.sources.3.weight=0.5 "
            "(repeatable)")


CONFIG_HELP = ("a packaged recipe by name (cpu-1h, quickstart, smoke, e5-mistral-7b, ...: `ray-e5 recipes` lists them) "
               "or a YAML config file; a file that exists wins over a recipe of the same name")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config NAME|FILE, any number of --set KEY=VALUE overrides (dotted keys) and --address."""
    parser.add_argument("--config", metavar="NAME|FILE", help=CONFIG_HELP)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=SET_HELP)
    parser.add_argument("--address", help="Ray cluster address (default: a local cluster)")


def config_from_args(args):
    """The whole config from --config/--set/--address, every section validated (all errors in one ConfigError)."""
    from ray_e5.config import load_config
    from ray_e5.recipes import recipe_path

    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"ray_address={args.address}")
    return load_config(recipe_path(args.config) if args.config else None, overrides)
