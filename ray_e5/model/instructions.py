"""The E5 instruction template: queries carry the task, documents go in as they are."""

from __future__ import annotations

DEFAULT_TEMPLATE = "Instruct: {task}\nQuery: {text}"


def format_query(text: str, task: str | None, template: str = DEFAULT_TEMPLATE) -> str:
    """Wrap a query in the instruction template; with no task (a document) the text is unchanged."""
    if not task:
        return text
    return template.format(task=task, text=text)
