"""Parse and validate an LLM answer; anything malformed is dropped with a reason, never raised."""

from __future__ import annotations

import json
import re

from ray_e5.synth.taxonomy import Kind

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.S)


class Dropped(Exception):
    """An answer that cannot become a row; ``reason`` is the manifest's counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_json(text: str | None) -> dict:
    if not text or not text.strip():
        raise Dropped("empty_answer")
    body = _FENCE.sub("", text.strip())
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        start, end = body.find("{"), body.rfind("}")
        if start < 0:
            raise Dropped("not_json") from None
        if end <= start:
            raise Dropped("truncated_json") from None
        try:
            value = json.loads(body[start:end + 1])
        except json.JSONDecodeError:
            raise Dropped("malformed_json") from None
    if not isinstance(value, dict):
        raise Dropped("not_an_object")
    return value


def validate_answer(answer: dict, kind: Kind, min_chars: int, max_chars: int) -> dict:
    missing = [k for k in kind.output_keys if k not in answer]
    if missing:
        raise Dropped("missing_keys")
    out = {}
    for key in kind.output_keys:
        value = answer[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise Dropped("wrong_type")
        value = value.strip()
        if not value:
            raise Dropped("empty_field")
        if len(value) < min_chars or len(value) > max_chars:
            raise Dropped("length_out_of_bounds")
        out[key] = value
    if kind.min_words > 1 and any(len(v.split()) < kind.min_words for v in out.values()):
        raise Dropped("too_short")
    return out


def parse_tasks(text: str | None) -> list[str]:
    value = parse_json(text)
    tasks = value.get("tasks")
    if not isinstance(tasks, list):
        raise Dropped("missing_keys")
    found: list[str] = []
    for task in tasks:
        task = " ".join(task.split()) if isinstance(task, str) else ""
        if 10 < len(task) <= 500 and task not in found:  # a definition, not a word or an essay
            found.append(task)
    if not found:
        raise Dropped("no_tasks")
    return found
