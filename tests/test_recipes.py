"""Recipes are package data, addressable by name wherever a config is accepted; the wheel carries every one."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ray_e5.cli import main
from ray_e5.config import ConfigError
from ray_e5.recipes import RECIPES_DIR, list_recipes, recipe_path

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("ray-e5")


def test_the_checkout_link_and_the_package_hold_the_same_recipes():
    """configs/ links to ray_e5/recipes in a checkout; the package imported (the checkout's, or the installed wheel's
    as CI runs it) holds the same recipes, byte for byte."""
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == ROOT / "ray_e5" / "recipes"
    checkout = {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.yaml")}
    packaged = {p.name: p.read_bytes() for p in RECIPES_DIR.glob("*.yaml")}
    assert len(checkout) >= 5 and checkout == packaged
    names = {r.name for r in list_recipes()}
    assert {"cpu-1h", "quickstart", "smoke", "e5-mistral-7b", "multilingual-eval"} <= names
    assert all(r.description and not r.description.startswith("#") for r in list_recipes())


def test_config_names_resolve_and_a_path_wins(tmp_path, monkeypatch):
    assert recipe_path("cpu-1h") == RECIPES_DIR / "cpu-1h.yaml" == recipe_path("cpu-1h.yaml")
    monkeypatch.chdir(tmp_path)  # outside a checkout: configs/<name>.yaml still means the packaged recipe
    assert recipe_path("configs/smoke.yaml") == RECIPES_DIR / "smoke.yaml"
    own = tmp_path / "cpu-1h"
    own.write_text("run_dir: mine\n")
    assert recipe_path("cpu-1h").resolve() == own  # an existing file wins over the packaged name
    with pytest.raises(ConfigError, match=r"'nope' does not exist \(as a file or a packaged recipe\); packaged recipes: .*cpu-1h"):
        recipe_path("nope")


def test_recipes_commands_list_and_copy(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list_recipes()) and any(line.split()[0] == "cpu-1h" for line in lines)
    target = tmp_path / "mine.yaml"
    assert main(["recipes", "cp", "cpu-1h", str(target)]) == 0
    assert target.read_text() == (RECIPES_DIR / "cpu-1h.yaml").read_text()
    target.write_text("edited\n")
    assert main(["recipes", "cp", "quickstart", str(target)]) == 2  # refuses to overwrite
    assert "exists; pass --force" in capsys.readouterr().err and target.read_text() == "edited\n"
    assert main(["recipes", "cp", "quickstart", str(target), "--force"]) == 0
    assert target.read_text() == (RECIPES_DIR / "quickstart.yaml").read_text()
    assert main(["recipes", "cp", "nope", str(tmp_path / "x.yaml")]) == 2
    assert "packaged recipes: cpu-1h" in capsys.readouterr().err


def test_config_by_name_from_another_directory(tmp_path):
    """`--config cpu-1h` from a directory that holds no configs/: the console script, as a user runs it."""
    ok = subprocess.run([str(EXE), "validate", "--config", "cpu-1h", "--set", "run_dir=x"], cwd=tmp_path,
                        capture_output=True, text=True)
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok"), ok.stderr
    bad = subprocess.run([str(EXE), "validate", "--config", "cpu-2h"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "packaged recipes: cpu-1h" in bad.stderr + bad.stdout


def test_recipe_comments_say_what_not_which_run_scored_what():
    for recipe in list_recipes():
        text = recipe.path.read_text()
        assert not re.search(r"README|\bruns? [A-Z]\b| vs ", text), f"{recipe.name}: a measured result in a comment"


def test_the_wheel_carries_every_recipe(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("ray_e5-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ray_e5/recipes/{p.name}" for p in RECIPES_DIR.glob("*.yaml")}
    assert len(expected) >= 5 and expected <= names, sorted(expected - names)
    assert "ray_e5/recipes/__init__.py" in names
