"""The package's layers hold: no import cycle among ray_e5's modules, and `ray-e5 --help` loads no stage's code.

A cycle is counted from every import statement (at module level and inside functions: a function-level import
only postpones the cycle to the first call) and from the registry's ``"ray_e5.x.y:Name"`` strings, which are
imports written down. The layers that keep the graph acyclic, lowest first: ``ray_e5.settings`` (nothing of
ray_e5) <- ``storage``, ``rundir``, ``lease``, the readers and the stage settings modules <- ``ray_e5.config`` <- the stages' code
<- ``ray_e5.stages`` and the commands.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ray_e5"
_REGISTRY_STRING = re.compile(r"ray_e5(\.\w+)+(:\w+)?")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module of ours that ``name`` (a module, or a name inside one) lives in."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ray_e5 it imports, anywhere in its file."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against the importing module's package
                    anchor = package[: len(package) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and _REGISTRY_STRING.fullmatch(node.value):
                targets = [node.value.partition(":")[0]]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "ray_e5":
                    continue
                owner = _owner(target, mods)
                if owner and owner != module:
                    graph[module].add(owner)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "ray_e5.settings" in graph["ray_e5.config"]  # module level
    assert "ray_e5.generate.run" in graph["ray_e5.stages"]  # inside a function
    assert "ray_e5.train.config" in graph["ray_e5.stages"]  # a registry string, "ray_e5.train.config:TrainSettings"
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles (each line: the modules of one cycle):\n" + "\n".join(
        ", ".join(component) for component in found)


def test_the_base_imports_nothing_of_the_package():
    assert import_graph()["ray_e5.settings"] == set()


def test_help_loads_no_stage_code_nor_torch_or_ray():
    code = "import sys, ray_e5.cli; ray_e5.cli.build_parser(); print('\\n'.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout.split())
    assert not {"torch", "ray"} & loaded
    stage_code = sorted(m for m in loaded if re.fullmatch(r"ray_e5\.(generate|train|evaluate|serve)\.\w+", m)
                        and m.rpartition(".")[2] not in ("command", "config", "taxonomy"))
    assert not stage_code, stage_code  # its subcommand and settings, nothing more
