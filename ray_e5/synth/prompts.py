"""Prompt templates (our own words, the paper's semantics) and the JSON schemas that constrain the answers.

Step 1 (asymmetric kinds only) asks for a list of about 20 task definitions; step 2 asks for one example of one
task, with the sampled placeholders (query type and length, clarity, length in words, language, difficulty).
``PROMPT_VERSION`` is part of every example id: changing a template means new ids, so a resumed run never mixes
answers to old and new prompts under one id.
"""

from __future__ import annotations

from ray_e5.synth.taxonomy import Kind, language_name

PROMPT_VERSION = "v2"

_BRAINSTORM = {
    "short-long": (
        "text retrieval tasks, where a short query is used to find longer documents",
        ["Given a question about a medication, retrieve patient leaflets that answer it.",
         "Given a product name, retrieve customer reviews that discuss its durability."],
        "Say what the query is and what the documents to retrieve are. Each task should cover a broad range of "
        "queries, not one narrow topic."),
    "long-short": (
        "text classification tasks, where a text is assigned one label from a small label set",
        ["Classify a restaurant review by the aspect it complains about most.",
         "Decide whether a news headline reports a political, economic or sports event."],
        "Say what the input text is and what the labels are."),
    "short-short": (
        "text matching tasks where both sides are short: a word, a phrase or one sentence",
        ["Given a job title, retrieve other job titles that describe the same role.",
         "Given a short claim, retrieve a one-sentence statement that supports it."],
        "Say what the query is and what the short texts to retrieve are."),
    "long-long": (
        "text matching tasks where both sides are long documents of several paragraphs",
        ["Given a patent application, retrieve earlier patents that describe the same invention.",
         "Given a research paper, retrieve papers that reuse its experimental method."],
        "Say what the query document is and what the documents to retrieve are."),
}


def brainstorm_prompt(kind: str, n: int = 20) -> str:
    what, examples, guideline = _BRAINSTORM[kind]
    lines = "\n".join(f"- {e}" for e in examples)
    return (f"Think up a list of useful {what}. Two examples, for reference only:\n{lines}\n"
            f"{guideline} Write each task as one English sentence, and make the tasks differ from each other and "
            f"from the examples. Answer with a JSON object whose only key \"tasks\" holds a list of about {n} "
            "task definitions (strings). Output the JSON object and nothing else. Be creative!")


def example_prompt(kind: Kind, task: str, language: str, values: dict, tgt_language: str | None = None) -> str:
    lang = language_name(language)
    keys = ", ".join(f'"{k}"' for k in kind.output_keys)
    v = values
    if kind.name == "short-long":
        body = (f"Your retrieval task is: {task}\nWrite one example for this task as a JSON object with the string "
                f"keys {keys}.\n"
                "- \"user_query\": a search query that a user of this task might type;\n"
                "- \"positive_document\": a document that is relevant to the query;\n"
                "- \"hard_negative_document\": a document that only seems relevant: it carries some useful "
                "information but is clearly less helpful than the positive document.\n"
                f"Rules: the query is {v['query_type']}, {v['query_length']} long, {v['clarity']}, and on a topic "
                "of your choice. Write the documents on their own, without repeating the query word for word; the "
                "positive document may also cover things beyond the query. Each document has at least "
                f"{v['num_words']} words. Never explain inside a document why it is or is not relevant. The query "
                f"and documents are in {lang} and need {v['difficulty']}-level education to follow.")
    elif kind.name == "long-short":
        body = (f"Your text classification task is: {task}\nWrite one example for this task as a JSON object with "
                f"the string keys {keys}.\n"
                "- \"input_text\": a text to classify;\n"
                "- \"label\": the correct label of that text;\n"
                "- \"misleading_label\": a label that is valid for this task but wrong (or less fitting) for this "
                "text.\n"
                f"Rules: the input text has {v['num_words']} words, is {v['clarity']}, varies in style, and does not "
                f"spell out the label. It is in {lang} and needs {v['difficulty']}-level education to follow.")
    elif kind.name == "short-short":
        body = (f"Your text matching task is: {task}\nWrite one example for this task as a JSON object with the "
                f"string keys {keys}.\n"
                "- \"input\": a query for this task;\n"
                "- \"positive_document\": a text that matches the input.\n"
                "Rules: both are short (a phrase or one sentence), share few words with each other, and are in "
                f"{lang}.")
    elif kind.name == "long-long":
        body = (f"Your text matching task is: {task}\nWrite one example for this task as a JSON object with the "
                f"string keys {keys}.\n"
                "- \"input\": a long query document for this task;\n"
                "- \"positive_document\": a long document that matches the input.\n"
                "Rules: each of the two texts has at least 300 words, they share few sentences with each other, "
                f"and both are in {lang}.")
    elif kind.name == "sts":
        body = (f"Write three {v['unit']}s, S1, S2 and S3, that differ in how similar in meaning they are, as a JSON "
                f"object with the string keys {keys}. Similarity is scored from 1 (unrelated) to 5 (same "
                f"meaning).\nRules: S1 and S2 score {v['high_score']}; S1 and S3 score {v['low_score']}. All three "
                f"are in {lang} and need {v['difficulty']}-level education to follow.")
    elif kind.name == "bitext":
        tgt = language_name(tgt_language or "en")
        body = (f"Write three {v['unit']}s, S1 in {lang} and S2 and S3 in {tgt}, as a JSON object with the string "
                f"keys {keys}. Translation quality is scored from 1 (unrelated) to 5 (perfect translation).\n"
                f"Rules: S2 translates S1 with quality {v['high_score']}; S3 translates S1 with quality "
                f"{v['low_score']}. They need {v['difficulty']}-level education to follow.")
    else:  # pragma: no cover - KINDS is closed
        raise KeyError(kind.name)
    return body + "\nOutput the JSON object and nothing else, with no explanation. Be creative!"


def answer_schema(keys: tuple[str, ...]) -> dict:
    return {"type": "object", "properties": {k: {"type": "string"} for k in keys}, "required": list(keys),
            "additionalProperties": False}


BRAINSTORM_SCHEMA = {"type": "object", "properties": {"tasks": {"type": "array", "items": {"type": "string"}}},
                     "required": ["tasks"], "additionalProperties": False}
