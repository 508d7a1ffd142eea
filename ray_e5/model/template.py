"""The E5 query template: queries carry the task, documents go in as they are.

(Named for the template that wraps a text; which instruction each evaluation task gets is
``ray_e5.evaluate.instructions``.)
"""

from __future__ import annotations

DEFAULT_TEMPLATE = "Instruct: {task}\nQuery: {text}"


def format_query(text: str, task: str | None, template: str = DEFAULT_TEMPLATE) -> str:
    """Wrap a query in the instruction template; with no task (a document) the text is unchanged."""
    if not task:
        return text
    return template.format(task=task, text=text)
