"""Parse and validate an LLM answer; anything malformed is dropped with a reason, never raised.

An answer is whatever bytes a server sent, so every step is bounded: the text's size before any parsing (a
megabyte answer is refused before json or a regex sees it), JSON nesting (``RecursionError``), integer literals
(Python refuses to convert more than 4300 digits, with a ``ValueError``), non-finite numbers (``NaN``, ``Infinity``,
``1e400``), and text that cannot become a row (lone surrogates, which no UTF-8 file can hold; control characters
such as NUL). Each becomes a :class:`Dropped` reason that the manifest counts; a rerun then never asks again."""

from __future__ import annotations

import json
import math
import re

from ray_e5.generate.taxonomy import Kind

# A brainstorm answer is about 20 task definitions of at most 500 characters: this bounds one with room to spare
# (JSON escapes included), and keeps the salvage regex below linear in practice.
MAX_TASKS_CHARS = 100_000
# An integer literal longer than this is no answer of ours (and past 4300 digits Python refuses to convert it).
MAX_INT_DIGITS = 64
# Text no row may hold: lone surrogates (not encodable as UTF-8, so neither JSON Lines nor Parquet can store them)
# and C0 control characters other than tab, newline and carriage return (NUL truncates text in C libraries).
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Scripts written without spaces between words: each ideograph or kana is about one word (Chinese averages 1.5
# characters a word, so this errs long); Thai, Lao, Khmer and Myanmar letters average about four to a word.
_IDEOGRAPHIC = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_SPACELESS_ALPHABETIC = re.compile(r"[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")
_WORDISH = re.compile(r"\w", re.U)
# Texts that name a field instead of filling it (a base model under a JSON grammar answers {"S1": "S2", ...}).
_PLACEHOLDER = re.compile(r"^[\[{<(]?\s*(s\d|[a-z]+(_[a-z]+)+|text|query|document|label|sentence|input|output|"
                          r"string|example|answer|\.\.\.|…)\s*[\]}>)]?[.:]?$", re.I)


class Dropped(Exception):
    """An answer that cannot become a row; ``reason`` is the manifest's counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored in a row (``unencodable_text``, ``control_characters``), or None."""
    if _SURROGATE.search(text):
        return "unencodable_text"
    if _CONTROL.search(text):
        return "control_characters"
    return None


def _int(literal: str) -> int:
    if len(literal) > MAX_INT_DIGITS:
        raise Dropped("huge_number")
    return int(literal)


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400
        raise Dropped("non_finite_number")
    return value


def _constant(name: str):  # NaN, Infinity, -Infinity: not JSON, though Python's parser takes them
    raise Dropped("non_finite_number")


def _loads(body: str):
    """``json.loads`` bounded: too deep a nesting and too long or non-finite numbers become drop reasons (the
    parser raises them as RecursionError and ValueError, which no caller expects)."""
    try:
        return json.loads(body, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise Dropped("nested_too_deep") from None


def _unfence(text: str) -> str:
    """The text inside a Markdown code fence (```json ... ```), or the text (string operations: a regex with
    ``\\s*`` before an anchor is quadratic on long runs of spaces)."""
    body = text.strip()
    if body.startswith("```"):
        body = body[3:]
        if body.startswith("json"):
            body = body[4:]
    if body.endswith("```"):
        body = body[:-3]
    return body.strip()


def parse_json(text, limit: int | None = None) -> dict:
    """The JSON object in an answer (a code fence and prose around it are tolerated). ``limit``: the most
    characters an answer may have (``answer_too_large`` beyond)."""
    if not isinstance(text, str):
        if text is None:
            raise Dropped("empty_answer")
        raise Dropped("not_json")
    if limit is not None and len(text) > limit:
        raise Dropped("answer_too_large")
    if not text.strip():
        raise Dropped("empty_answer")
    body = _unfence(text)
    try:
        value = _loads(body)
    except json.JSONDecodeError:
        start, end = body.find("{"), body.rfind("}")
        if start < 0:
            raise Dropped("not_json") from None
        if end <= start:
            raise Dropped("truncated_json") from None
        try:
            value = _loads(body[start:end + 1])
        except json.JSONDecodeError:
            raise Dropped("malformed_json") from None
    if not isinstance(value, dict):
        raise Dropped("not_an_object")
    return value


def word_count(text: str) -> int:
    """Words in ``text``, counted so that Chinese, Japanese and Thai are not judged by their (missing) spaces."""
    ideographs = len(_IDEOGRAPHIC.findall(text))
    spaceless = len(_SPACELESS_ALPHABETIC.findall(text))
    rest = _SPACELESS_ALPHABETIC.sub(" ", _IDEOGRAPHIC.sub(" ", text))
    words = sum(1 for token in rest.split() if _WORDISH.search(token))
    return words + ideographs + (spaceless + 3) // 4


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def degenerate(fields: dict[str, str], kind: Kind, prompt: str = "", task: str = "") -> str | None:
    """Why a well-formed answer is useless for training, or None: a field that names a key or a placeholder
    instead of text, two fields with the same text, or a field copied from our instructions."""
    keys = {_norm(k) for k in kind.output_keys} | {k.lower() for k in kind.output_keys}
    for value in fields.values():
        if _norm(value) in keys or value.strip().lower() in keys or _PLACEHOLDER.match(value.strip()):
            return "degenerate_key_echo"
    texts = [_norm(v) for v in fields.values()]
    if len(set(texts)) < len(texts):  # a query equal to its positive, a label equal to the misleading one
        return "degenerate_same_text"
    template = _norm(prompt.replace(task, " ")).split() if prompt else []
    if template:  # copied from our instructions or from the worked example: at least half its word pairs are ours
        ours = set(zip(template, template[1:]))
        for value in fields.values():
            words = _norm(value).split()
            pairs = list(zip(words, words[1:]))
            if len(words) >= 4 and sum(p in ours for p in pairs) >= 0.5 * len(pairs):
                return "degenerate_prompt_echo"
    return None


def validate_answer(answer: dict, kind: Kind, min_chars: int, max_chars: int, prompt: str = "",
                    task: str = "") -> dict:
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
        problem = text_problem(value)
        if problem:
            raise Dropped(problem)
        out[key] = value
    if kind.min_words > 1 and any(word_count(v) < kind.min_words for v in out.values()):
        raise Dropped("too_short")
    reason = degenerate(out, kind, prompt, task)
    if reason:
        raise Dropped(reason)
    return out


_QUOTED = re.compile(r'"((?:[^"\\]|\\.){11,500})"')


def _unescape(quoted: str) -> str:
    """A JSON string's body as text; '' when its escapes are broken."""
    if "\\" not in quoted:
        return quoted
    try:
        value = json.loads(f'"{quoted}"')
    except ValueError:  # a stray backslash (\q), a cut \u escape
        return ""
    return value if isinstance(value, str) else ""


def parse_tasks(text) -> list[str]:
    """The task definitions of a brainstorm answer: strings of 11 to 500 characters that a row can hold (others are
    left out); ``no_tasks`` when none is left."""
    try:
        value = parse_json(text, MAX_TASKS_CHARS)
    except Dropped as drop:  # a list cut short (max_tokens) or broken late still holds the tasks written before
        if not isinstance(text, str) or drop.reason not in ("not_json", "truncated_json", "malformed_json",
                                                             "not_an_object"):
            raise
        found = [t for t in _QUOTED.findall(text.split("[", 1)[-1]) if t != "tasks"]
        if not found:
            raise
        value = {"tasks": [_unescape(t) for t in found]}
    tasks = value.get("tasks")
    if not isinstance(tasks, list):
        raise Dropped("missing_keys")
    found: list[str] = []
    for task in tasks:
        task = " ".join(task.split()) if isinstance(task, str) else ""
        if text_problem(task):  # a task becomes part of a prompt, a request id and a row
            continue
        if 10 < len(task) <= 500 and task not in found:  # a definition, not a word or an essay
            found.append(task)
    if not found:
        raise Dropped("no_tasks")
    return found
