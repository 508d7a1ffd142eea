"""The stage registry: one entry per stage, and one name per stage shared by everything that refers to it.

A stage's name is its command (``ray-e5 <name>``), its config section (``<name>:`` in the YAML), its job entry
point (``jobs/<name>.py``) and its key in ``pipeline`` results, as torchtune's recipe registry gives one name to a
recipe's file, CLI command and config. The CLI subcommands, ``ray-e5 pipeline``, ``ray-e5 quickstart`` and
the job entry points are all derived from :data:`STAGES`.

The stage contract: a stage takes the whole validated :class:`~ray_e5.config.RayE5Config` (it reads its own
section and ``run_dir``, and joins the cluster at ``ray_address``), writes its outputs under ``run_dir`` (the
``outputs`` each entry declares, relative to the run directory), and returns a small typed result, built from
what it has in memory. Each entry names the stage package's own entry point and result class, nothing between.
A stage that ends with nothing the next ones can use raises :class:`~ray_e5.outcome.EmptyOutputError`.

The registry sits at the top, below only the commands: it imports nothing of ray_e5 at import time (settings
classes, run functions and result classes are imported when used), so ``ray-e5 --help`` loads no stage's code,
and nothing it imports imports it back (the config composes the sections itself, :mod:`ray_e5.config`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ray_e5.config import RayE5Config


def _load(ref: str) -> Any:
    """The object a ``"module:attr"`` string names, imported now."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---- the registry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """Something a stage leaves behind: ``path`` relative to the run directory (None: not a file, e.g. an
    HTTP endpoint), and what it holds."""

    path: str | None
    what: str


@dataclass(frozen=True)
class Stage:
    """One stage. ``settings``, ``run`` and ``result`` are ``"module:attr"`` strings, imported when used, so the
    registry loads no stage's code; none of the modules they name imports the registry back."""

    name: str  # the command, the config section, jobs/<name>.py
    package: str  # where the stage's code lives; its command is <package>.command (register(subparsers))
    settings: str  # "module:Class" of the section's settings (a ray_e5.settings.Section)
    run: str  # "module:function" of the stage's entry point, ``def <name>(config: RayE5Config) -> <result>``
    result: str  # "module:Class" of the typed result the entry point returns (a dataclass)
    outputs: tuple[Output, ...]
    help: str

    def settings_class(self) -> type:
        return _load(self.settings)

    def run_function(self) -> Callable[["RayE5Config"], Any]:
        """The stage's entry point: takes the whole config, returns an instance of :meth:`result_class`."""
        return _load(self.run)

    def result_class(self) -> type:
        return _load(self.result)

    @property
    def command_module(self) -> str:
        return f"{self.package}.command"

    @property
    def job(self) -> str:
        """The job entry point, relative to the repository root."""
        return f"jobs/{self.name}.py"


class UnknownStageError(ValueError):
    """A stage name that is not registered; the message lists the accepted ones."""


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("generate", "ray_e5.generate", "ray_e5.generate.config:GenerateSettings", "ray_e5.generate.run:generate",
          "ray_e5.generate.result:GenerateResult",
          (Output("synthetic/", "part-*.parquet shards (the training-example rows + provenance), brainstorm.json "
                                "(task definitions), manifest.json (examples, by_kind, drops, tokens, cost)"),),
          "LLM-written training examples (the paper's two-step prompting) on Ray Data"),
    Stage("train", "ray_e5.train", "ray_e5.train.config:TrainSettings", "ray_e5.train.run:train",
          "ray_e5.train.result:TrainResult",
          (Output("train/", "data.json (batch plan: rows read/used per source), run.json, metrics.jsonl, loss.png, "
                            "summary.json, Ray Train checkpoints"),
           Output("embedder/", "the trained embedder: ray_e5.json + adapter/ (LoRA)")),
          "contrastive LoRA fine-tuning of a decoder into an embedder on Ray Train"),
    Stage("evaluate", "ray_e5.evaluate", "ray_e5.evaluate.config:EvaluateSettings", "ray_e5.evaluate.run:evaluate",
          "ray_e5.evaluate.result:EvaluateResult",
          (Output("eval/", "results/<model>/<task>.json (per-task cache), report.json, report.md, scores.png"),),
          "MTEB evaluation with the paper's instructions, fanned out over Ray"),
    Stage("serve", "ray_e5.serve", "ray_e5.serve.config:ServeSettings", "ray_e5.serve.run:serve",
          "ray_e5.serve.result:ServeResult",
          (Output(None, "an OpenAI-compatible /v1/embeddings endpoint at http://<serve.host>:<serve.port>/v1 "
                        "serving <run_dir>/embedder (nothing written to the run directory)"),),
          "the embedder behind an OpenAI-compatible /v1/embeddings on Ray Serve"),
)}


def names() -> tuple[str, ...]:
    """The registered stages in pipeline order."""
    return tuple(STAGES)


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise UnknownStageError(f"unknown stage {name!r}; accepted: {', '.join(STAGES)}") from None


def select(names_: list[str] | tuple[str, ...]) -> tuple[Stage, ...]:
    """The named stages in pipeline order; every unknown name is reported at once."""
    unknown = [n for n in names_ if n not in STAGES]
    if unknown:
        raise UnknownStageError(f"unknown stage(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(STAGES)}")
    return tuple(s for s in STAGES.values() if s.name in names_)

