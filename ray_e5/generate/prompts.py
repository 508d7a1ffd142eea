"""Prompt templates (our own words, the paper's semantics) and the JSON schemas that constrain the answers.

Step 1 (asymmetric kinds only) asks for a list of about 20 task definitions; step 2 asks for one example of one
task, with the sampled placeholders (query type and length, clarity, length in words, language, difficulty).
``PROMPT_VERSION`` is part of every example id: changing a template means new ids, so a resumed run never mixes
answers to old and new prompts under one id.
"""

from __future__ import annotations

from ray_e5.generate.taxonomy import Kind, language_name

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


# ---- completion style: one worked example per kind, continued by a base model ---------------------------------
# A base model (the packaged Gemma 3 270M) does not follow instructions: asked for JSON under a grammar it answers
# {"S1": "S2", "S2": "S1"}. It does continue a pattern, so here each request is a short document: a header, one
# worked example of the kind (a header line and its JSON line), then the new header and the opening of the answer's
# JSON line, which the model completes up to the end of the line. The worked examples are ours.
_WORKED = {
    "short-long": (
        "Given a health question, retrieve web passages that answer it.",
        {"query_type": "common", "query_length": "5 to 15 words", "clarity": "clear", "num_words": 50,
         "difficulty": "high school"},
        {"user_query": "how do vaccines teach the immune system to fight a virus",
         "positive_document": "A vaccine shows the immune system a harmless piece of a virus, such as one of its "
                              "surface proteins. White blood cells learn to recognise that piece and make "
                              "antibodies against it. Memory cells keep this knowledge for years, so when the real "
                              "virus arrives the body can stop it before it spreads.",
         "hard_negative_document": "The first vaccine was made by Edward Jenner in 1796, who used cowpox to protect "
                                   "people against smallpox. Vaccination spread across Europe during the next "
                                   "century, and smallpox was declared eradicated in 1980."}),
    "long-short": (
        "Classify a product review as positive, negative or neutral.",
        {"num_words": "at least 10", "clarity": "clear", "difficulty": "high school"},
        {"input_text": "The battery died after two days and the support team never answered my emails, so I "
                       "returned it.",
         "label": "negative", "misleading_label": "neutral"}),
    "short-short": (
        "Given a question, retrieve a one-sentence answer to it.",
        {},
        {"input": "What is the capital of Australia?",
         "positive_document": "Canberra has been the seat of Australia's government since 1927."}),
    "long-long": (
        "Given a news article, retrieve another article about the same event.",
        {},
        {"input": "Heavy rain flooded the lower town on Monday night. The river rose two metres in six hours, and "
                  "firefighters moved forty families to the school gym. The mayor said the new flood wall had "
                  "held in the north but was not finished in the south.",
         "positive_document": "Residents of the lower town spent Tuesday clearing mud from their homes after the "
                              "river burst its banks. Officials said the unfinished southern section of the flood "
                              "barrier let the water in, and promised to complete it before winter."}),
    "sts": (
        "Retrieve semantically similar text.",
        {"unit": "sentence", "high_score": 4.5, "low_score": 2.5, "difficulty": "high school"},
        {"S1": "A man is playing a guitar on a small stage.",
         "S2": "On a little stage, a man performs with his guitar.",
         "S3": "A man is carrying a guitar case down the street."}),
    "bitext": (
        "Retrieve parallel sentences.",
        {"unit": "sentence", "high_score": 5, "low_score": 2, "difficulty": "high school"},
        {"S1": "The train to the airport leaves every twenty minutes.",
         "S2": "Le train pour l'aéroport part toutes les vingt minutes.",
         "S3": "Le train pour la gare part chaque heure."}),
}


# A topic per example steers a base model away from copying the worked example (which is on none of these).
TOPICS = ("cooking", "football", "gardening", "banking", "astronomy", "car repair", "travel by train", "pets",
          "computer games", "weather", "hospital care", "school exams", "city politics", "music lessons",
          "online shopping", "mountain hiking", "insurance", "chemistry", "film reviews", "job interviews",
          "farming", "smartphones", "history of Rome", "fashion", "tax returns", "birds", "electricity bills",
          "wedding plans", "basketball", "the ocean")


def _header(kind: Kind, task: str, language: str, values: dict, tgt_language: str | None = None) -> str:
    v, lang = values, language_name(language)
    topic = f" Topic: {v['topic']}." if v.get("topic") else ""
    return _header_body(kind, task, lang, v, tgt_language) + topic


def _header_body(kind: Kind, task: str, lang: str, v: dict, tgt_language: str | None) -> str:
    if kind.name == "short-long":
        return (f"Task: {task}\nQuery: {v['query_type']}, {v['query_length']}, {v['clarity']}. Documents: about "
                f"{v['num_words']} words, {v['difficulty']} level, in {lang}.")
    if kind.name == "long-short":
        return (f"Task: {task}\nText: {v['num_words']} words, {v['clarity']}, {v['difficulty']} level, in {lang}. "
                "Label: the correct label; misleading label: a wrong one.")
    if kind.name in ("short-short", "long-long"):
        return f"Task: {task}\nLanguage: {lang}."
    if kind.name == "sts":
        return (f"Task: three {v['unit']}s in {lang} at {v['difficulty']} level; S1 and S2 mean nearly the same "
                f"(similarity {v['high_score']} of 5), S1 and S3 share words but differ in meaning "
                f"({v['low_score']} of 5).")
    tgt = language_name(tgt_language or "en")  # bitext
    return (f"Task: a {v['unit']} S1 in {lang} at {v['difficulty']} level, S2 its translation into {tgt} (quality "
            f"{v['high_score']} of 5) and S3 a poor translation into {tgt} ({v['low_score']} of 5).")


def _opening(keys: tuple[str, ...]) -> str:
    return '{"' + keys[0] + '": "'


def completion_prompt(kind: Kind, task: str, language: str, values: dict, tgt_language: str | None = None) -> str:
    """A few-shot document whose last line is the opening of the answer's JSON line (see :func:`answer_text`)."""
    import json

    w_task, w_values, w_answer = _WORKED[kind.name]
    w_tgt = "fr" if kind.name == "bitext" else None
    worked = json.dumps(w_answer, ensure_ascii=False)
    w_values = {**w_values, "topic": "music" if kind.name == "sts" else "health"}
    return ("Training examples for a text embedding model, one JSON line each, written for the task above it.\n\n"
            f"{_header(kind, w_task, 'en', w_values, w_tgt)}\n{worked}\n\n"
            f"{_header(kind, task, language, values, tgt_language)}\n{_opening(kind.output_keys)}")


def brainstorm_completion_prompt(kind: str, n: int = 20) -> str:
    import json

    what, examples, _ = _BRAINSTORM[kind]
    more = {"short-long": "Given a legal question, retrieve court rulings that address it.",
            "long-short": "Classify an email as spam or not spam.",
            "short-short": "Given a company name, retrieve its industry.",
            "long-long": "Given a product manual, retrieve manuals of similar products."}[kind]
    first = json.dumps({"tasks": [*examples, more]})
    return (f"Lists of {what}, for training text embedding models. Each list is one JSON line of about {n} "
            f"different tasks, each one English sentence.\n{first}\n" + '{"tasks": ["')


def answer_text(prompt: str, continuation: str | None) -> str:
    """The whole answer of a completion-style request: the opening our prompt ended with, then what the model
    wrote up to the end of that line."""
    return prompt.rsplit("\n", 1)[-1] + (continuation or "").split("\n", 1)[0]
