"""The training-example row contract, and the check that turns raw records into rows or counted problems.

A row (ARCHITECTURE.md): ``task`` (the instruction), ``kind`` (short-long, long-short, short-short, long-long, sts,
bitext, labeled), ``language``, ``query``, ``positive``, ``negative`` (may be empty), plus provenance. Raw records
come as triplets (``query``/``positive``/``negative``), as pairs (``sentence1``/``sentence2``/``score``, as the
STS and bitext sets are stored) or as labeled texts (``text``/``label``, a classification set's train split), which
become the paper's long-short (classification) examples: the text as the query, its label as the positive (the
misleading label, the negative, is chosen per source by :func:`ray_e5.data.sources.read_rows`). A source trained
with the CoSENT loss (``graded``) keeps each pair's ``score``; the column is null on every other row. A record that
cannot be a training example is not an error: it is skipped and its reason counted, so one bad line never stops a
run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

CONTRACT = ("task", "kind", "language", "query", "positive", "negative")
# Columns of a normalised row: the contract, where it came from, a graded pair's score (None on other rows), and
# why it was rejected ("" when it was not).
ROW_COLUMNS = ("source",) + CONTRACT + ("score", "problem")
GRADED_EXPECTS = "the source is graded (loss cosent): expected sentence1/sentence2/score pairs"
FILTERED_PREFIX = "filtered: "  # reasons that are a deliberate selection (min_score), not bad data


@dataclass(frozen=True)
class RowDefaults:
    """What a source supplies to rows that lack it."""

    source: str
    task: str = ""
    kind: str = "labeled"
    language: str = "en"
    min_score: float | None = None
    graded: bool = False  # pairs keep their score, for the CoSENT loss (a score is then required)


def rows_table(rows: list[dict]):
    """Normalised rows as an Arrow table of ROW_COLUMNS (strings, and ``score`` as float64 with nulls)."""
    import pyarrow as pa

    return pa.table({c: pa.array([r.get(c) for r in rows], type=pa.float64() if c == "score" else pa.string())
                     for c in ROW_COLUMNS})


def _text(record: Mapping[str, Any], key: str, required: bool) -> tuple[str, str | None]:
    value = record.get(key)
    if value is None:
        return "", (f"missing {key}" if required else None)
    if not isinstance(value, str):
        return "", f"{key} is {type(value).__name__}, expected a string"
    if required and not value.strip():
        return "", f"empty {key}"
    return value, None


def _score(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def normalize_record(record: Any, defaults: RowDefaults) -> dict[str, str]:
    """One raw record as a row with every ROW_COLUMNS key; ``problem`` says why it cannot train ("" if it can)."""
    row = {"source": defaults.source, "task": defaults.task, "kind": defaults.kind, "language": defaults.language,
           "query": "", "positive": "", "negative": "", "score": None, "problem": ""}
    if not isinstance(record, Mapping):
        row["problem"] = f"record is {type(record).__name__}, expected an object"
        return row
    if "query" not in record and "text" in record and "label" in record:  # a labeled text (classification)
        text, problem = _text(record, "text", required=True)
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            problem = problem or f"label is {label!r}, expected a non-empty string or an integer"
        row.update(query=text, positive=label_text(label) if not problem else "", kind="long-short",
                   problem=problem or "")
        if defaults.graded and not row["problem"]:
            row["problem"] = f"a labeled text, but {GRADED_EXPECTS}"
        return row
    if "query" not in record and "sentence1" in record:  # a pair: (sentence1, sentence2[, score])
        keys = ("sentence1", "sentence2", None)
        if defaults.min_score is not None or defaults.graded:
            score = _score(record.get("score"))
            if score is None:
                why = "min_score is set" if defaults.min_score is not None else "the source is graded (loss cosent)"
                row["problem"] = f"score is {record.get('score')!r}, expected a number ({why})"
                return row
            if defaults.min_score is not None and score < defaults.min_score:
                row["problem"] = f"{FILTERED_PREFIX}score below min_score {defaults.min_score:g}"
                return row
            if defaults.graded:
                row["score"] = score
    elif defaults.graded:
        row["problem"] = f"a triplet, but {GRADED_EXPECTS}"
        return row
    else:
        keys = ("query", "positive", "negative")
    problems = []
    for column, key in zip(("query", "positive", "negative"), keys):
        if key is None:
            continue
        row[column], problem = _text(record, key, required=column != "negative")
        if problem:
            problems.append(problem)
    for column in ("task", "kind", "language"):
        value = record.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # the source's default stands
        if not isinstance(value, str):
            problems.append(f"{column} is {type(value).__name__}, expected a string")
        else:
            row[column] = value
    row["problem"] = "; ".join(problems)
    return row


def label_text(label: Any) -> str:
    """A class label as the text a model embeds: ``card_arrival`` -> ``card arrival``."""
    return " ".join(str(label).replace("_", " ").split())


def is_filtered(problem: str) -> bool:
    return problem.startswith(FILTERED_PREFIX)
