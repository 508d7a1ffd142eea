"""Instruction formatting: the task goes on queries only; documents (positives, negatives) stay as they are."""

from __future__ import annotations

from typing import Sequence

from ray_e5.model.template import DEFAULT_TEMPLATE, format_query


def format_queries(queries: Sequence[str], tasks: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Each query wrapped in the template with its own task (rows of one batch may carry different tasks)."""
    if len(queries) != len(tasks):
        raise ValueError(f"{len(queries)} queries but {len(tasks)} tasks")
    return [format_query(q, t, template) for q, t in zip(queries, tasks)]
