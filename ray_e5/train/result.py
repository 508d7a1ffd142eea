"""The train stage's typed result (imports nothing heavy: the registry and the pipeline name it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainResult:
    """``embedder_uri``: ``<run_dir>/embedder`` (may be remote); ``local_dir``: a local copy of it; ``steps``:
    optimiser steps trained; ``summary``: what ``train/summary.json`` holds; ``data``: what ``train/data.json``
    holds (the batch plan, rows read and used per source); ``published_step``: the step of the checkpoint whose
    embedder was published (the last, or with ``train.keep_best`` the best); ``published_by``: then the metric and
    its value, ``{"metric": "dev/mean", "value": 0.71}``."""

    embedder_uri: str
    steps: int
    local_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    published_step: int | None = None
    published_by: dict[str, Any] | None = None
