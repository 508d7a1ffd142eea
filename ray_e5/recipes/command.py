"""`ray-e5 recipes`: list the packaged recipes; `ray-e5 recipes cp NAME FILE`: copy one to edit."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "recipes", help="list the packaged recipes (any of them works as --config NAME); `recipes cp` copies one",
        description="Lists the recipes shipped with ray-e5, one per line: its name (what --config accepts) and what "
                    "it is. `ray-e5 recipes cp NAME FILE` copies one to edit.")
    actions = parser.add_subparsers(dest="action")
    copy = actions.add_parser("cp", help="copy a packaged recipe to a file to edit",
                              description="Copies the packaged recipe NAME to FILE (or into FILE/NAME.yaml when FILE "
                                          "is a folder); an existing file is kept unless --force.")
    copy.add_argument("name", metavar="NAME", help="a packaged recipe (see `ray-e5 recipes`)")
    copy.add_argument("file", metavar="FILE", help="where to write it")
    copy.add_argument("--force", action="store_true", help="overwrite FILE when it exists")
    actions.add_parser("ls", help="list the packaged recipes (the default)")
    parser.set_defaults(func=_recipes)


def _recipes(args) -> int:
    from ray_e5.recipes import list_recipes

    if args.action == "cp":
        return _copy(args.name, Path(args.file), args.force)
    recipes = list_recipes()
    width = max(len(r.name) for r in recipes)
    for recipe in recipes:
        print(f"{recipe.name:{width}}  {recipe.description}")
    return 0


def _copy(name: str, target: Path, force: bool) -> int:
    from ray_e5.recipes import recipe_names, list_recipes

    found = {r.name: r for r in list_recipes()}.get(name.removesuffix(".yaml"))
    if found is None:
        print(f"ray-e5 recipes cp: error: {name!r} is not a packaged recipe; packaged recipes: "
              f"{', '.join(recipe_names())}", file=sys.stderr)
        return 2
    if target.is_dir():
        target = target / found.path.name
    if target.exists() and not force:
        print(f"ray-e5 recipes cp: error: {target} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found.path, target)
    print(f"copied recipe {found.name} to {target}; run it with --config {target}")
    return 0
