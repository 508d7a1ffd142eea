"""The paper's task taxonomy: kinds, their placeholder value sets, output keys, and how answers map to rows.

Wang et al. 2024 (Table 1, Appendix C): asymmetric kinds (short-long, long-short, short-short, long-long) are
brainstormed first (an LLM lists task definitions), then one example per (task, placeholders) is generated;
symmetric kinds (STS, bitext) skip the brainstorm and use a fixed task.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CLARITY = ["clear", "understandable with some effort", "ambiguous"]
DIFFICULTY = ["high school", "college", "PhD"]
SYMMETRIC_DIFFICULTY = ["elementary school", "high school", "college"]
UNITS = ["sentence", "phrase", "passage"]


@dataclass(frozen=True)
class Kind:
    name: str
    placeholders: dict[str, list]  # besides task and language
    output_keys: tuple[str, ...]
    brainstorm: bool
    fixed_task: str | None = None
    min_words: int = 1  # per output text (long-long: 300)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("short-long", {"query_type": ["extremely long-tail", "long-tail", "common"],
                        "query_length": ["less than 5 words", "5 to 15 words", "at least 10 words"],
                        "clarity": CLARITY, "num_words": [50, 100, 200, 300, 400, 500], "difficulty": DIFFICULTY},
         ("user_query", "positive_document", "hard_negative_document"), True),
    Kind("long-short", {"num_words": ["less than 10", "at least 10", "at least 50", "at least 100", "at least 200"],
                        "clarity": CLARITY, "difficulty": DIFFICULTY},
         ("input_text", "label", "misleading_label"), True),
    Kind("short-short", {}, ("input", "positive_document"), True),
    Kind("long-long", {}, ("input", "positive_document"), True, min_words=300),
    Kind("sts", {"unit": UNITS, "high_score": [4, 4.5, 5], "low_score": [2.5, 3, 3.5],
                 "difficulty": SYMMETRIC_DIFFICULTY},
         ("S1", "S2", "S3"), False, fixed_task="Retrieve semantically similar text."),
    Kind("bitext", {"unit": UNITS, "high_score": [4, 4.5, 5], "low_score": [1.5, 2, 2.5],
                    "difficulty": SYMMETRIC_DIFFICULTY},
         ("S1", "S2", "S3"), False, fixed_task="Retrieve parallel sentences."),
)}

# The paper's counts per kind (thousands): the default mix.
PAPER_MIX = {"short-long": 167, "long-short": 122, "sts": 99, "bitext": 89, "long-long": 17, "short-short": 13}

# The XLM-R languages (CC-100), by ISO code; weights favour high-resource languages (English gets
# `english_share`, the rest share the remainder by rough resource size).
HIGH = ["zh", "es", "fr", "de", "ru", "ja", "pt", "it", "ar", "ko", "nl", "pl", "tr", "vi", "id", "fa", "sv", "hi"]
MID = ["cs", "ro", "hu", "el", "da", "fi", "no", "th", "uk", "bg", "he", "ca", "sk", "hr", "lt", "sl", "sr", "et",
       "lv", "ms", "bn", "ta", "ur", "te", "ml", "mr", "kn", "gu", "ka", "hy", "az", "kk", "sq", "mk", "is", "tl"]
LOW = ["af", "am", "as", "be", "br", "bs", "cy", "eo", "eu", "fy", "ga", "gd", "gl", "ha", "jv", "km", "ku", "ky",
       "la", "lo", "mg", "mn", "my", "ne", "om", "or", "pa", "ps", "sa", "sd", "si", "so", "su", "sw", "ug", "uz",
       "xh", "yi"]
LANGUAGES = ["en", *HIGH, *MID, *LOW]
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "es": "Spanish", "fr": "French", "de": "German", "ru": "Russian",
                  "ja": "Japanese", "pt": "Portuguese", "it": "Italian", "ar": "Arabic", "ko": "Korean", "nl": "Dutch",
                  "pl": "Polish", "tr": "Turkish", "vi": "Vietnamese", "id": "Indonesian", "fa": "Persian",
                  "sv": "Swedish", "hi": "Hindi"}


def language_weights(english_share: float) -> dict[str, float]:
    rest = {code: w for group, w in ((HIGH, 4.0), (MID, 1.5), (LOW, 0.5)) for code in group}
    total = sum(rest.values())
    return {"en": english_share, **{c: (1 - english_share) * w / total for c, w in rest.items()}}


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


def sample_placeholders(kind: Kind, rng: random.Random) -> dict:
    values = {key: rng.choice(options) for key, options in kind.placeholders.items()}
    if kind.name == "sts" or kind.name == "bitext":
        if values["low_score"] >= values["high_score"]:
            values["low_score"] = min(kind.placeholders["low_score"])
    return values


def to_row(kind: Kind, answer: dict, task: str, language: str, tgt_language: str | None = None) -> dict:
    """Map a validated answer onto the training-example contract (query, positive, negative)."""
    if kind.name == "short-long":
        q, p, n = answer["user_query"], answer["positive_document"], answer["hard_negative_document"]
    elif kind.name == "long-short":
        q, p, n = answer["input_text"], answer["label"], answer["misleading_label"]
    elif kind.name in ("short-short", "long-long"):
        q, p, n = answer["input"], answer["positive_document"], ""
    else:
        q, p, n = answer["S1"], answer["S2"], answer["S3"]
    return {"task": task, "kind": kind.name, "language": language if not tgt_language else f"{language}-{tgt_language}",
            "query": q, "positive": p, "negative": n}
