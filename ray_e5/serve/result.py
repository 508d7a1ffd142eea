"""The serve stage's typed result (imports nothing heavy: the registry and the pipeline name it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeResult:
    """``url``: the base URL for the openai client (``http://host:port/v1``); ``model_name``: the name clients
    send as ``model``."""

    url: str
    model_name: str
