"""What any stage may raise when it finished but left nothing the next stages can use.

The pipeline treats every stage the same: a stage raising :class:`EmptyOutputError` stops the pipeline with the
error's remedy appended, or, when the user allowed it, logs one warning and goes on with the stage's result. It
lives in the base layer (nothing of ray_e5 imported) so that any stage's errors can derive from it and the
pipeline can catch it without importing a stage.
"""

from __future__ import annotations

from typing import Any


class EmptyOutputError(Exception):
    """A stage ended with an empty output (e.g. generation wrote no valid row).

    Subclasses say what the pipeline prints: ``remedy`` is appended to the message when the pipeline stops,
    ``going_on`` ends the warning when the user lets it go on; :attr:`result` is the stage's typed result for
    what it did write, and :meth:`with_remedy` the same error with the remedy in its message."""

    remedy: str = ""
    going_on: str = ""

    @property
    def result(self) -> Any:
        raise NotImplementedError

    def with_remedy(self) -> "EmptyOutputError":
        raise NotImplementedError
