"""One content digest for every key ray-e5 derives from data: request ids, cache keys, run fingerprints."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys; anything JSON
    cannot hold is written with ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
