"""The `generate:` section: backend, how many examples of which kinds and languages, limits and filters."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_e5.config import Section
from ray_e5.synth.taxonomy import KINDS, LANGUAGES, PAPER_MIX

# USD per 1M tokens (input, output); used for the cost estimate and the budget cap.
PRICES = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6), "gpt-4.1": (2.0, 8.0), "gpt-4.1-mini": (0.4, 1.6),
          "gpt-4-turbo": (10.0, 30.0), "gpt-3.5-turbo": (0.5, 1.5)}


class VllmSettings(Section):
    """ray.data.llm's vLLM engine on GPU nodes (built here, run only on a GPU cluster)."""

    model: str = "mistralai/Mistral-7B-Instruct-v0.3"
    concurrency: int = Field(1, gt=0)
    tensor_parallel_size: int = Field(1, gt=0)
    batch_size: int = Field(64, gt=0)
    max_model_len: int = Field(4096, gt=0)


class GenerateSettings(Section):
    backend: Literal["llamacpp", "openai", "azure", "endpoint", "vllm"] = "llamacpp"
    model: str = "gemma3-270m"  # the model name the backend is asked for (llamacpp: the packaged GGUF)
    base_url: str | None = None  # endpoint: any OpenAI-compatible server (vLLM's, llama.cpp's)
    api_key_env: str = "OPENAI_API_KEY"
    azure_api_version: str = "2024-10-21"
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    # ---- what to generate ------------------------------------------------------------------------------------
    num_examples: int = Field(64, gt=0)
    mix: dict[str, float] = Field(default_factory=lambda: dict(PAPER_MIX))
    english_share: float = Field(0.43, ge=0, le=1)
    languages: list[str] | None = None  # restrict to these codes (weights renormalised)
    tasks_per_brainstorm: int = Field(20, gt=0)
    seed: int = 0
    # ---- decoding and limits ---------------------------------------------------------------------------------
    max_tokens: int = Field(768, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    json_schema: bool = True  # constrained decoding where the backend has it
    concurrency: int = Field(8, gt=0)  # requests in flight per actor
    actors: int = Field(1, gt=0)  # max actors in the autoscaling pool
    request_timeout_s: float = Field(120, gt=0)
    max_retries: int = Field(5, ge=0)
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    budget_usd: float | None = Field(None, gt=0)
    time_budget_s: float | None = Field(None, gt=0)
    # ---- filters ---------------------------------------------------------------------------------------------
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(20000, gt=1)
    near_duplicate_threshold: float = Field(0.9, gt=0, lt=1)
    contamination_paths: list[str] = Field(default_factory=list)  # eval files/folders whose text must not leak
    contamination_ngram: int = Field(13, gt=2)
    shard_size: int = Field(1000, gt=0)

    @field_validator("mix")
    @classmethod
    def _known_kinds(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(mix) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown kind(s) {unknown}; accepted: {sorted(KINDS)}")
        if any(w < 0 for w in mix.values()) or not any(w > 0 for w in mix.values()):
            raise ValueError("weights must be >= 0 with at least one > 0")
        return mix

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, langs: list[str] | None) -> list[str] | None:
        if langs is not None:
            unknown = sorted(set(langs) - set(LANGUAGES))
            if unknown:
                raise ValueError(f"unknown language code(s) {unknown}; accepted: {', '.join(LANGUAGES)}")
        return langs

    @model_validator(mode="after")
    def _backend_needs(self) -> "GenerateSettings":
        if self.backend in ("openai", "azure") and not os.environ.get(self.api_key_env):
            raise ValueError(f"backend {self.backend!r} needs an API key in the environment variable "
                             f"{self.api_key_env} (set generate.api_key_env to use another variable)")
        if self.backend in ("endpoint", "azure") and not self.base_url:
            raise ValueError(f"backend {self.backend!r} needs generate.base_url")
        return self
