"""Parse and validate an LLM answer; anything malformed is dropped with a reason, never raised."""

from __future__ import annotations

import json
import re

from ray_e5.generate.taxonomy import Kind

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.S)
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
        out[key] = value
    if kind.min_words > 1 and any(word_count(v) < kind.min_words for v in out.values()):
        raise Dropped("too_short")
    reason = degenerate(out, kind, prompt, task)
    if reason:
        raise Dropped(reason)
    return out


_QUOTED = re.compile(r'"((?:[^"\\]|\\.){11,500})"')


def parse_tasks(text: str | None) -> list[str]:
    try:
        value = parse_json(text)
    except Dropped:  # a list cut short (max_tokens) or broken late still holds the tasks written before
        found = [t for t in _QUOTED.findall((text or "").split("[", 1)[-1]) if t != "tasks"]
        if not found:
            raise
        value = {"tasks": [json.loads(f'"{t}"') if "\\" in t else t for t in found]}
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
