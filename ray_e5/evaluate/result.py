"""The evaluate stage's typed result (imports nothing heavy: the registry and the pipeline name it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskError:
    """One (model, task) pair that failed, with the reason the worker gave."""

    model: str
    task: str
    error: str


@dataclass(frozen=True)
class EvaluateResult:
    """``report_paths``: ``{"json", "markdown", "png", ...}`` (empty when ``evaluate.report`` is off); ``scores``:
    model label -> task -> main score (x100; None where the task failed); ``errors``: the pairs that failed;
    ``output``: where results and the report are written; ``report``: the whole report as ``report.json`` holds it
    (plus ``ran``, ``cached``, ``wall_seconds``, ``output`` and ``paths``)."""

    report_paths: dict[str, str]
    scores: dict[str, dict[str, float | None]]
    errors: list[TaskError]
    output: str
    report: dict[str, Any] = field(default_factory=dict)
