"""Why a generation run stops: each error names what failed and what to do; nothing written is lost."""

from __future__ import annotations

from ray_e5.generate.result import GenerateResult
from ray_e5.outcome import EmptyOutputError
from ray_e5.settings import ConfigError


class GenerateError(ConfigError):
    """The run cannot go on (bad eval paths, a server that refuses the key or model); nothing written is lost."""


class BackendError(GenerateError):
    """The generator backend is gone or unreachable (a dead llama.cpp server, every first request failing)."""


class EmptySyntheticError(GenerateError, EmptyOutputError):
    """A non-empty plan ended with no valid row on disk: the next stage would train on nothing synthetic.

    ``ray-e5 generate`` exits non-zero; ``quickstart`` and ``pipeline`` stop unless ``--allow-empty-synthetic``.
    ``manifest`` is the manifest that was written (drop reasons included), ``uri`` the ``synthetic/`` folder."""

    remedy = "pass --allow-empty-synthetic to train on the labeled sources alone"
    going_on = "going on without synthetic data (--allow-empty-synthetic)"

    def __init__(self, message: str, manifest: dict | None = None, uri: str = ""):
        super().__init__(message)
        self.manifest = manifest or {}
        self.uri = uri

    @property
    def result(self) -> GenerateResult:
        return GenerateResult.from_manifest(self.manifest, self.uri)

    def with_remedy(self) -> "EmptySyntheticError":
        return EmptySyntheticError(f"{self} ({self.remedy})", self.manifest, self.uri)
