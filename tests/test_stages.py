"""The stage registry: one name per stage for the command, the config section, the job entry point and the results;
every stage has a subcommand, a settings class, a job and documented outputs; no import cycles between modules."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ray_e5.config import RayE5Config, Section
from ray_e5.stages import STAGES, UnknownStageError, get, select

ROOT = Path(__file__).resolve().parents[1]


def _subcommands() -> dict:
    from ray_e5.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_stages_in_pipeline_order():
    assert list(STAGES) == ["generate", "train", "evaluate", "serve"]


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_has_a_subcommand_of_its_name(name):
    stage = STAGES[name]
    parser = _subcommands()[name]
    assert parser.get_default("func") is not None
    assert stage.command_module in sys.modules  # the subcommand comes from the stage's own command module
    args = parser.parse_args(["--config", "x.yaml", "--set", "a.b=1"])
    assert (args.config, args.overrides) == ("x.yaml", ["a.b=1"])


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_has_a_settings_class_that_is_its_config_section(name):
    cls = STAGES[name].settings_class()
    assert issubclass(cls, Section)
    assert name in RayE5Config.model_fields  # the section is named as the stage
    assert isinstance(RayE5Config().section(name, cls), cls)  # defaults validate on their own


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_has_a_job_entry_point_running_its_command(name):
    job = ROOT / STAGES[name].job
    assert job.is_file(), job
    calls = [n for n in ast.walk(ast.parse(job.read_text())) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "job_main"]
    assert calls and isinstance(calls[0].args[0], ast.Constant) and calls[0].args[0].value == name


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_documents_its_outputs(name):
    stage = STAGES[name]
    assert stage.outputs and all(out.what for out in stage.outputs)
    assert dataclasses.is_dataclass(stage.result_class())
    docs = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for out in stage.outputs:
        if out.path is not None:
            assert f"{out.path}" in docs, f"{out.path} ({name}) is not described in docs/ARCHITECTURE.md"
    assert f"`{name}`" in docs


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_entry_point_returns_its_typed_result(name):
    """The registry names the stage package's own entry point, ``def <name>(config) -> <Result>``, and its result
    class: a dataclass with a concrete type on every field."""
    stage = STAGES[name]
    module, _, function = stage.run.partition(":")
    assert module == f"{stage.package}.run" and function == name
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    entry = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    assert [a.arg for a in entry.args.args][:1] == ["config"]
    assert ast.unparse(entry.returns) == stage.result.partition(":")[2]
    cls = stage.result_class()
    assert dataclasses.is_dataclass(cls)
    assert all(f.type != "Any" for f in dataclasses.fields(cls)), dataclasses.fields(cls)


def test_result_modules_import_light():
    """The pipeline and the commands name the results without loading a stage's code, torch or ray."""
    modules = sorted({stage.result.partition(":")[0] for stage in STAGES.values()})
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}];"
            "print(sorted(m for m in sys.modules if m.startswith('ray_e5')), 'torch' in sys.modules, "
            "'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    packages = sorted({"ray_e5", *modules, *(m.rpartition(".")[0] for m in modules)})
    assert out == f"{packages} False False", out


def test_unknown_stage_names_are_all_listed():
    with pytest.raises(UnknownStageError, match=r"'trian', 'evaluation'.*accepted: generate, train, evaluate, serve"):
        select(["generate", "trian", "evaluation"])
    with pytest.raises(UnknownStageError, match="accepted"):
        get("eval")
    assert [s.name for s in select(["serve", "generate"])] == ["generate", "serve"]  # registry order


def test_jobs_cover_the_pipeline_too():
    """A job per stage, the pipeline's, and those of the commands beside the pipeline (embed: a corpus to vectors)."""
    assert (ROOT / "jobs" / "pipeline.py").is_file()
    assert {p.stem for p in (ROOT / "jobs").glob("*.py")} == {*STAGES, "pipeline", "embed"}


# ---- import structure ----------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_command_module_imports_the_cli_back():
    for stage in STAGES.values():
        path = ROOT / (stage.command_module.replace(".", "/") + ".py")
        assert "ray_e5.cli" not in _imports(path), path
    assert "ray_e5.cli" not in _imports(ROOT / "ray_e5" / "pipeline" / "command.py")


def test_pipeline_does_not_import_stage_packages():
    """The pipeline reaches the stages through the registry only (serve imports nothing of the pipeline back); it
    may name the stages' typed results, the small modules the registry names as each stage's ``result``."""
    results = {stage.result.partition(":")[0] for stage in STAGES.values()}
    for path in (ROOT / "ray_e5" / "pipeline").glob("*.py"):
        stage_imports = {m for m in _imports(path) if m.startswith(tuple(f"ray_e5.{s}" for s in STAGES))} - results
        assert not stage_imports, (path.name, stage_imports)


def test_registry_and_cli_import_light():
    """The registry is a leaf (no ray_e5 module, no torch or ray) and `ray-e5 --help` needs neither torch nor ray."""
    code = ("import sys, ray_e5.stages; leaf = sorted(m for m in sys.modules if m.startswith('ray_e5'));"
            "import ray_e5.cli; ray_e5.cli.build_parser();"
            "print(leaf, 'torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['ray_e5', 'ray_e5.stages'] False False", out
