"""The generate stage's typed result (imports nothing heavy: the registry and the pipeline name it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GenerateResult:
    """``manifest``: ``<run_dir>/synthetic/manifest.json`` as written; ``rows``: valid examples on disk (this run
    and the runs it continued); ``by_kind``: those rows per kind; ``uri``: the ``synthetic/`` folder."""

    manifest: dict[str, Any]
    rows: int
    by_kind: dict[str, int]
    uri: str

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any] | None, uri: str) -> "GenerateResult":
        manifest = dict(manifest or {})
        return cls(manifest, int(manifest.get("examples", 0)), dict(manifest.get("by_kind", {})), uri)
