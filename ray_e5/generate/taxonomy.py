"""The paper's task taxonomy: kinds, their placeholder value sets, output keys, languages, and how answers map to rows.

Wang et al. 2024 (Section 3.1, Appendix C): asymmetric kinds (short-long, long-short, short-short, long-long) are
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
    placeholders: dict[str, list]  # besides task and language (bitext: besides src_lang and tgt_lang)
    output_keys: tuple[str, ...]  # the JSON keys the LLM answers with, in (query, positive, negative) order
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

# The XLM-R (CC-100) languages the paper samples from, by ISO 639-1 code, grouped by how much web text they have.
# Default weights: English gets `english_share` (0.43, as in the paper), the rest share the remainder 8 : 3 : 1
# (high : mid : low resource), so a high-resource language is drawn eight times as often as a low-resource one.
LANGUAGE_NAMES = {
    "en": "English",
    # high resource
    "zh": "Chinese", "es": "Spanish", "fr": "French", "de": "German", "ru": "Russian", "ja": "Japanese",
    "pt": "Portuguese", "it": "Italian", "ar": "Arabic", "ko": "Korean", "nl": "Dutch", "pl": "Polish",
    "tr": "Turkish", "vi": "Vietnamese", "id": "Indonesian", "fa": "Persian", "sv": "Swedish", "hi": "Hindi",
    # mid resource
    "cs": "Czech", "ro": "Romanian", "hu": "Hungarian", "el": "Greek", "da": "Danish", "fi": "Finnish",
    "no": "Norwegian", "th": "Thai", "uk": "Ukrainian", "bg": "Bulgarian", "he": "Hebrew", "ca": "Catalan",
    "sk": "Slovak", "hr": "Croatian", "lt": "Lithuanian", "sl": "Slovenian", "sr": "Serbian", "et": "Estonian",
    "lv": "Latvian", "ms": "Malay", "bn": "Bengali", "ta": "Tamil", "ur": "Urdu", "te": "Telugu",
    "ml": "Malayalam", "mr": "Marathi", "kn": "Kannada", "gu": "Gujarati", "ka": "Georgian", "hy": "Armenian",
    "az": "Azerbaijani", "kk": "Kazakh", "sq": "Albanian", "mk": "Macedonian", "is": "Icelandic",
    "tl": "Tagalog",
    # low resource
    "af": "Afrikaans", "am": "Amharic", "as": "Assamese", "be": "Belarusian", "br": "Breton", "bs": "Bosnian",
    "cy": "Welsh", "eo": "Esperanto", "eu": "Basque", "fy": "Western Frisian", "ga": "Irish",
    "gd": "Scottish Gaelic", "gl": "Galician", "ha": "Hausa", "jv": "Javanese", "km": "Khmer", "ku": "Kurdish",
    "ky": "Kyrgyz", "la": "Latin", "lo": "Lao", "mg": "Malagasy", "mn": "Mongolian", "my": "Burmese",
    "ne": "Nepali", "om": "Oromo", "or": "Odia", "pa": "Punjabi", "ps": "Pashto", "sa": "Sanskrit",
    "sd": "Sindhi", "si": "Sinhala", "so": "Somali", "su": "Sundanese", "sw": "Swahili", "ug": "Uyghur",
    "uz": "Uzbek", "xh": "Xhosa", "yi": "Yiddish",
}
LANGUAGES = list(LANGUAGE_NAMES)
HIGH = LANGUAGES[1:19]
MID = LANGUAGES[19:55]
LOW = LANGUAGES[55:]
GROUP_WEIGHTS = ((HIGH, 8.0), (MID, 3.0), (LOW, 1.0))


def language_weights(english_share: float = 0.43, only: list[str] | None = None,
                     explicit: dict[str, float] | None = None) -> dict[str, float]:
    """Sampling weights (summing to 1) over language codes.

    ``explicit`` replaces the defaults entirely; ``only`` keeps a subset (renormalised).
    """
    if explicit:
        weights = dict(explicit)
    else:
        rest = {code: w for group, w in GROUP_WEIGHTS for code in group}
        total = sum(rest.values())
        weights = {"en": english_share, **{c: (1 - english_share) * w / total for c, w in rest.items()}}
    if only:
        weights = {c: weights.get(c, 0.0) for c in only}
        if not any(weights.values()):  # e.g. only=["en"] with english_share=0
            weights = {c: 1.0 for c in only}
    total = sum(weights.values())
    return {c: w / total for c, w in weights.items() if w > 0}


def language_name(code: str) -> str:
    return LANGUAGE_NAMES[code]


def sample_placeholders(kind: Kind, rng: random.Random) -> dict:
    """One value per placeholder. For STS and bitext the paper's sets already keep low_score < high_score."""
    return {key: rng.choice(options) for key, options in kind.placeholders.items()}


def bitext_target(source: str, rng: random.Random, languages: list[str]) -> str:
    """Bitext pairs a language with English; English itself is paired with another sampled language."""
    if source != "en":
        return "en"
    others = [c for c in languages if c != "en"] or HIGH
    return rng.choice(others)


def to_row(kind: Kind, answer: dict, task: str, language: str, tgt_language: str | None = None) -> dict:
    """Map a validated answer onto the training-example contract (query, positive, negative)."""
    texts = [answer[k] for k in kind.output_keys]
    query, positive = texts[0], texts[1]
    negative = texts[2] if len(texts) > 2 else ""
    return {"task": task, "kind": kind.name, "language": f"{language}-{tgt_language}" if tgt_language else language,
            "query": query, "positive": positive, "negative": negative}
