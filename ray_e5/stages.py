"""The stage registry: one entry per stage, and one name per stage shared by everything that refers to it.

A stage's name is its command (``ray-e5 <name>``), its config section (``<name>:`` in the YAML), its job entry
point (``jobs/<name>.py``) and its key in ``pipeline`` results, as torchtune's recipe registry gives one name to a
recipe's file, CLI command and config. The CLI subcommands, ``ray-e5 pipeline``, ``ray-e5 quickstart`` and
the job entry points are all derived from :data:`STAGES`.

The stage contract: a stage takes the whole validated :class:`~ray_e5.config.RayE5Config` (it reads its own
section and ``run_dir``, and joins the cluster at ``ray_address``), writes its outputs under ``run_dir`` (the
``outputs`` each entry declares, relative to the run directory), and returns a small typed result. The run
functions here are adapters: they call each stage package's own entry point and wrap what it returns.

The registry sits at the top, below only the commands: it imports nothing of ray_e5 at import time (settings
classes and run functions are imported when used), so ``ray-e5 --help`` loads no stage's code, and nothing it
imports imports it back (the config composes the sections itself, :mod:`ray_e5.config`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ray_e5.config import RayE5Config


# ---- typed results -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateResult:
    """``manifest``: ``<run_dir>/synthetic/manifest.json`` as written; ``rows``: valid examples on disk (this run
    and the runs it continued); ``by_kind``: those rows per kind."""

    manifest: dict[str, Any]
    rows: int
    by_kind: dict[str, int]
    uri: str

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any] | None, uri: str) -> "GenerateResult":
        manifest = dict(manifest or {})
        return cls(manifest, int(manifest.get("examples", 0)), dict(manifest.get("by_kind", {})), uri)


@dataclass(frozen=True)
class TrainResult:
    """``embedder_uri``: ``<run_dir>/embedder`` (may be remote); ``local_dir``: a local copy of it; ``steps``:
    optimiser steps trained; ``summary``: ``train/summary.json``; ``data``: ``train/data.json`` (the batch plan,
    rows read and used per source)."""

    embedder_uri: str
    steps: int
    local_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateResult:
    """``report_paths``: ``{"json", "markdown", "png"}`` (empty when ``evaluate.report`` is off); ``scores``:
    model label -> task -> main score (x100); ``errors``: the tasks that failed; ``report``: the whole report."""

    report_paths: dict[str, str]
    scores: dict[str, Any]
    errors: Any
    output: str
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServeResult:
    """``url``: the base URL for the openai client (``http://host:port/v1``); ``model_name``: the name clients
    send as ``model``."""

    url: str
    model_name: str


# ---- the registry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """Something a stage leaves behind: ``path`` relative to the run directory (None: not a file, e.g. an
    HTTP endpoint), and what it holds."""

    path: str | None
    what: str


@dataclass(frozen=True)
class Stage:
    name: str  # the command, the config section, jobs/<name>.py
    package: str  # where the stage's code lives; its command is <package>.command (register(subparsers))
    settings: str  # "module:Class" of the section's settings (a ray_e5.settings.Section), imported when needed
    run: Callable[["RayE5Config"], Any]  # adapter returning ``result``
    result: type
    outputs: tuple[Output, ...]
    help: str

    def settings_class(self) -> type:
        module, _, attr = self.settings.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def command_module(self) -> str:
        return f"{self.package}.command"

    @property
    def job(self) -> str:
        """The job entry point, relative to the repository root."""
        return f"jobs/{self.name}.py"


class UnknownStageError(ValueError):
    """A stage name that is not registered; the message lists the accepted ones."""


def _run_generate(config: "RayE5Config") -> GenerateResult:
    from ray_e5.rundir import RunDir
    from ray_e5.generate.run import generate

    manifest = generate(config)
    return GenerateResult.from_manifest(manifest, RunDir.of(config.run_dir).synthetic)


def _run_train(config: "RayE5Config") -> TrainResult:
    from ray_e5.rundir import RunDir
    from ray_e5.train.run import train

    local_dir = Path(train(config))
    run = RunDir.of(config.run_dir)
    summary = _read_json(run.join("train", "summary.json"))
    return TrainResult(embedder_uri=summary.get("embedder", run.embedder), steps=int(summary.get("steps", 0)),
                       local_dir=local_dir, summary=summary, data=_read_json(run.join("train", "data.json")))


def _run_evaluate(config: "RayE5Config") -> EvaluateResult:
    from ray_e5.evaluate.run import evaluate

    report = evaluate(config)
    return EvaluateResult(report_paths=dict(report.get("paths") or {}), scores=dict(report.get("scores") or {}),
                          errors=report.get("errors"), output=str(report.get("output", "")), report=report)


def _run_serve(config: "RayE5Config") -> ServeResult:
    from ray_e5.serve.config import ServeSettings
    from ray_e5.serve.run import serve

    settings = config.section("serve", ServeSettings)
    return ServeResult(url=serve(config, blocking=False), model_name=settings.model_name)


def _read_json(uri: str) -> dict[str, Any]:
    from ray_e5 import runs

    return runs.read_json(uri) if runs.exists(uri) else {}


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("generate", "ray_e5.generate", "ray_e5.generate.config:GenerateSettings", _run_generate, GenerateResult,
          (Output("synthetic/", "part-*.parquet shards (the training-example rows + provenance), brainstorm.json "
                                "(task definitions), manifest.json (examples, by_kind, drops, tokens, cost)"),),
          "LLM-written training examples (the paper's two-step prompting) on Ray Data"),
    Stage("train", "ray_e5.train", "ray_e5.train.config:TrainSettings", _run_train, TrainResult,
          (Output("train/", "data.json (batch plan: rows read/used per source), run.json, metrics.jsonl, loss.png, "
                            "summary.json, Ray Train checkpoints"),
           Output("embedder/", "the trained embedder: ray_e5.json + adapter/ (LoRA)")),
          "contrastive LoRA fine-tuning of a decoder into an embedder on Ray Train"),
    Stage("evaluate", "ray_e5.evaluate", "ray_e5.evaluate.config:EvaluateSettings", _run_evaluate, EvaluateResult,
          (Output("eval/", "results/<model>/<task>.json (per-task cache), report.json, report.md, scores.png"),),
          "MTEB evaluation with the paper's instructions, fanned out over Ray"),
    Stage("serve", "ray_e5.serve", "ray_e5.serve.config:ServeSettings", _run_serve, ServeResult,
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

