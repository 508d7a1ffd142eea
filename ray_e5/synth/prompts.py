"""Prompt templates (our own words, the paper's semantics) and the JSON schemas that constrain the answers."""

from __future__ import annotations

from ray_e5.synth.taxonomy import Kind, language_name

BRAINSTORM = {
    "short-long": "Brainstorm a list of potentially useful text retrieval tasks. Each task pairs a short query "
                  "with longer documents that answer it.",
    "long-short": "Brainstorm a list of potentially useful text classification tasks, where a text is assigned "
                  "one label from a small set.",
    "short-short": "Brainstorm a list of text matching tasks where both the query and the document are short "
                   "(a few words or one sentence).",
    "long-long": "Brainstorm a list of text matching tasks where both the query and the document are long texts "
                 "(several paragraphs).",
}


def brainstorm_prompt(kind: str, n: int = 20) -> str:
    return (f"{BRAINSTORM[kind]}\nHere are a few examples for your reference:\n"
            "- Given a web search query, retrieve relevant passages that answer the query.\n"
            "- Classify a customer review as positive, negative or neutral.\n"
            f"Give about {n} diverse task definitions, each one sentence long and in English, in a JSON object "
            "with one key \"tasks\" holding a list of strings. Be creative.")


def example_prompt(kind: Kind, task: str, language: str, values: dict, tgt_language: str | None = None) -> str:
    lang = language_name(language)
    keys = ", ".join(f'"{k}"' for k in kind.output_keys)
    if kind.name == "short-long":
        body = (f"You have been assigned a retrieval task: {task}\nWrite one example for it as a JSON object with "
                f"keys {keys}:\n- \"user_query\": a {values['query_type']} query of {values['query_length']}, "
                f"{values['clarity']}, that a user of this task would write;\n- \"positive_document\": a document of "
                f"about {values['num_words']} words that answers the query;\n- \"hard_negative_document\": a document "
                "that looks relevant but does not answer it.\n"
                f"The query and documents are in {lang}, at {values['difficulty']} level.")
    elif kind.name == "long-short":
        body = (f"You have been assigned a text classification task: {task}\nWrite one example as a JSON object with "
                f"keys {keys}:\n- \"input_text\": a text of {values['num_words']} words, {values['clarity']}, "
                f"in {lang}, at {values['difficulty']} level;\n- \"label\": its correct label;\n"
                "- \"misleading_label\": a plausible but wrong label from the same label set.")
    elif kind.name in ("short-short", "long-long"):
        size = "at least 300 words each" if kind.name == "long-long" else "short: a few words to one sentence"
        body = (f"You have been assigned a text matching task: {task}\nWrite one example as a JSON object with keys "
                f"{keys}: \"input\" and its matching \"positive_document\", both {size}, in {lang}.")
    elif kind.name == "sts":
        body = (f"Write a {values['unit']}-level semantic similarity example in {lang} as a JSON object with keys "
                f"{keys}: S1 and S2 have a similarity score of {values['high_score']} (on a 1-5 scale), S1 and S3 a "
                f"score of {values['low_score']}. Use {values['difficulty']}-level language.")
    else:
        body = (f"Write a {values['unit']}-level translation example as a JSON object with keys {keys}: S1 is in "
                f"{lang}; S2 is in {language_name(tgt_language or 'en')} and translates S1 with a quality score of "
                f"{values['high_score']} (1-5); S3 is in {language_name(tgt_language or 'en')} and translates S1 "
                f"with a score of {values['low_score']}. Use {values['difficulty']}-level language.")
    return body + "\nAnswer with the JSON object only, no other text."


def answer_schema(keys: tuple[str, ...]) -> dict:
    return {"type": "object", "properties": {k: {"type": "string"} for k in keys}, "required": list(keys),
            "additionalProperties": False}


BRAINSTORM_SCHEMA = {"type": "object", "properties": {"tasks": {"type": "array", "items": {"type": "string"}}},
                     "required": ["tasks"], "additionalProperties": False}
