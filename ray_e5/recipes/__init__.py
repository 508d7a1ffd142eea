"""The packaged recipes: one YAML config per recipe, shipped inside the wheel so that `--config NAME` works from any
directory, not only from a checkout (where ``configs/`` is a link to this folder).

A recipe's description is its first comment line; `ray-e5 recipes` lists them and `ray-e5 recipes cp NAME FILE`
copies one to edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray_e5.settings import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent
SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str


class UnknownRecipeError(ConfigError):
    """``--config`` named neither an existing file nor a packaged recipe."""


def _description(path: Path) -> str:
    """The recipe's first comment line, without its ``#``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def list_recipes() -> list[Recipe]:
    """Every packaged recipe, by name."""
    return [Recipe(p.stem, p, _description(p)) for p in sorted(RECIPES_DIR.iterdir()) if p.suffix in SUFFIXES]


def recipe_names() -> list[str]:
    return [r.name for r in list_recipes()]


def recipe_path(name_or_path: str | Path) -> Path:
    """The file a ``--config`` value means: an existing file as it is (a path wins), else the packaged recipe of
    that name (``cpu-1h`` or ``cpu-1h.yaml``). Anything else raises :class:`UnknownRecipeError` listing the
    packaged names."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    stem = given.name
    for suffix in SUFFIXES:
        stem = stem.removesuffix(suffix)
    for recipe in list_recipes():
        if recipe.name == stem and (given.parent == Path(".") or not given.parent.exists()):
            return recipe.path
    raise UnknownRecipeError(f"config {str(name_or_path)!r} does not exist (as a file or a packaged recipe); "
                             f"packaged recipes: {', '.join(recipe_names())} (`ray-e5 recipes` describes them)")
