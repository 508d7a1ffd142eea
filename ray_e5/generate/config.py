"""The `generate:` section: backend, how many examples of which kinds and languages, limits and filters.

Everything a run could be refused for (an unknown kind or language, a negative count, a hosted backend without its
API key, a budget for a model without a price) is checked here, before any request is sent. The key itself is
never stored in the settings, only the name of the environment variable that holds it.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_e5.settings import Section
from ray_e5.generate.taxonomy import KINDS, LANGUAGES, PAPER_MIX

# USD per 1M tokens (input, output), for the cost estimate and the budget cap; `generate.prices` adds or overrides.
PRICES = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6), "gpt-4.1": (2.0, 8.0), "gpt-4.1-mini": (0.4, 1.6),
          "gpt-4.1-nano": (0.1, 0.4), "gpt-4-turbo": (10.0, 30.0), "gpt-4": (30.0, 60.0),
          "gpt-3.5-turbo": (0.5, 1.5), "o3-mini": (1.1, 4.4), "o4-mini": (1.1, 4.4)}
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY"}
HOSTED = ("openai", "azure")
LOCAL = ("llamacpp", "transformers")  # writers on this machine: no bill


def _refuse_unknown_kinds(by_kind: dict) -> None:
    unknown = sorted(set(by_kind) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kind(s) {unknown}; accepted: {', '.join(KINDS)}")


class VllmSettings(Section):
    """vLLM on GPU nodes. ``engine: serve``: one Ray Serve LLM deployment answers both generation steps
    (ray_e5/generate/vllm_server.py); ``batch``: ray.data.llm's processor, engines started per step."""

    model: str = "mistralai/Mistral-7B-Instruct-v0.3"
    engine: Literal["serve", "batch"] = "serve"
    serve_port: int = Field(8100, gt=0, lt=65536)  # serve: the Serve HTTP port (proxies on every node)
    start_timeout_s: float = Field(1800.0, gt=0)  # serve: time for the engines to load
    concurrency: int = Field(1, gt=0)  # vLLM engine replicas (each tensor_parallel_size GPUs)
    tensor_parallel_size: int = Field(1, gt=0)
    batch_size: int = Field(64, gt=0)
    max_model_len: int = Field(4096, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    accelerator_type: str | None = None  # e.g. "H100", to pin the engine to one GPU type


class ConsistencySettings(Section):
    """``generate.consistency``: keep a row when a reference embedder ranks its positive above its hard negative
    and within ``top_k`` of ``pool`` positives of its kind (see :mod:`ray_e5.generate.consistency`)."""

    model: str = "minilm-l6"  # any model reference: a packaged name, an embedder directory, a Hub id
    top_k: int = Field(10, gt=0)
    pool: int = Field(100, gt=1)
    cpus: float = Field(1, gt=0)  # the Ray task that scores the rows


class GenerateSettings(Section):
    # llamacpp: a llama.cpp server on a GGUF; transformers: the in-process batched writer (ray_e5.generate.
    # local_writer) on a causal LM, no server; openai/azure/endpoint: an OpenAI-compatible API; vllm: vLLM engines
    backend: Literal["llamacpp", "transformers", "openai", "azure", "endpoint", "vllm"] = "llamacpp"
    model: str = "gemma3-270m"  # the model the backend is asked for (azure: the deployment name)
    base_url: str | None = None  # endpoint: any OpenAI-compatible server; azure: the resource endpoint
    api_key_env: str | None = None  # default OPENAI_API_KEY (openai) / AZURE_OPENAI_API_KEY (azure); none otherwise
    azure_api_version: str = "2024-10-21"
    json_mode: Literal["auto", "json_schema", "json_object_schema", "json_object", "off"] = "auto"
    # chat: instructions (an instruction-tuned writer); completion: one worked example per kind, continued by the
    # model on the completions endpoint (a base model such as the packaged Gemma 3 270M); auto: completion for
    # llamacpp, chat otherwise.
    prompt_style: Literal["auto", "chat", "completion"] = "auto"
    gguf: str | None = None  # llamacpp: a .gguf file (default: the packaged Gemma 3 270M)
    llamacpp_ctx: int = Field(4096, gt=0)
    writer_batch: int = Field(32, gt=0)  # transformers: prompts sampled together in one batch
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    consistency: ConsistencySettings | None = None  # off by default; {} for the defaults
    # ---- what to generate ------------------------------------------------------------------------------------
    num_examples: int = Field(64, gt=0)  # planned requests; malformed answers are dropped, not replaced
    mix: dict[str, float] = Field(default_factory=lambda: dict(PAPER_MIX))
    english_share: float = Field(0.43, ge=0, le=1)
    languages: list[str] | None = None  # restrict to these codes (weights renormalised)
    language_weights: dict[str, float] | None = None  # replace the default weights entirely
    tasks_per_brainstorm: int = Field(20, gt=0)  # the paper asks for about 20 task definitions per request
    examples_per_task: float = Field(3.3, gt=0)  # paper: 500k examples over 150k tasks
    seed: int = 0
    # ---- decoding and limits ---------------------------------------------------------------------------------
    max_tokens: int = Field(1024, gt=0)
    max_tokens_by_kind: dict[str, int] = Field(default_factory=dict)  # e.g. {sts: 96}: short kinds need less
    brainstorm_max_tokens: int = Field(1024, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    concurrency: int = Field(8, gt=0)  # requests in flight per actor
    actors: int = Field(1, gt=0)  # the most actors the autoscaling pool grows to
    actor_cpus: float = Field(0.25, gt=0)
    request_timeout_s: float = Field(120, gt=0)
    max_retries: int = Field(5, ge=0)  # the openai client's own retries (429/5xx/timeouts, Retry-After honoured)
    requests_per_minute: int | None = Field(None, gt=0)  # client-side, shared by all actors
    tokens_per_minute: int | None = Field(None, gt=0)
    budget_usd: float | None = Field(None, gt=0)  # for the whole run directory, resumed runs included
    prices: dict[str, tuple[float, float]] = Field(default_factory=dict)  # model -> (USD/1M in, USD/1M out)
    time_budget_s: float | None = Field(None, gt=0)
    # ---- filters and output ----------------------------------------------------------------------------------
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(20000, gt=1)
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)  # MinHash Jaccard; 1 keeps near-duplicates
    contamination_paths: list[str] = Field(default_factory=list)  # eval files/folders whose text must not leak
    contamination_ngram: int = Field(13, gt=2)
    shard_size: int = Field(1000, gt=0)  # rows per Parquet shard
    flush_every_s: float = Field(30, gt=0)  # also write a shard this often, so a kill loses little
    progress: bool = True
    # ---- the OpenAI Batch API (openai, azure): half the price, answers within 24 h ---------------------------
    batch_api: bool = False  # each phase's requests as Batch API files; a rerun re-attaches (synthetic/batches.json)
    batch_max_requests: int = Field(50_000, gt=0, le=50_000)  # requests per batch file (the API's limit)
    batch_max_bytes: int = Field(200_000_000, gt=0, le=200_000_000)  # bytes per batch file (the API's limit)
    batch_poll_s: float = Field(15.0, gt=0)  # first wait between polls, growing by half each poll ...
    batch_poll_max_s: float = Field(300.0, gt=0)  # ... up to this
    batch_resubmits: int = Field(1, ge=0)  # times a run resubmits lines of a batch that failed or expired
    batch_discount: float = Field(0.5, gt=0, le=1)  # Batch API price as a share of the synchronous price

    @field_validator("mix")
    @classmethod
    def _known_kinds(cls, mix: dict[str, float]) -> dict[str, float]:
        _refuse_unknown_kinds(mix)
        negative = sorted(k for k, w in mix.items() if w < 0)
        if negative:
            raise ValueError(f"negative weight for {negative}; weights are counts or shares >= 0")
        if not any(w > 0 for w in mix.values()):
            raise ValueError("at least one kind needs a weight > 0")
        return mix

    @field_validator("max_tokens_by_kind")
    @classmethod
    def _max_tokens_kinds(cls, value: dict[str, int]) -> dict[str, int]:
        _refuse_unknown_kinds(value)
        if any(v <= 0 for v in value.values()):
            raise ValueError("token limits must be > 0")
        return value

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, langs: list[str] | None) -> list[str] | None:
        if langs is not None:
            unknown = sorted(set(langs) - set(LANGUAGES))
            if unknown:
                raise ValueError(f"unknown language code(s) {unknown}; accepted: {', '.join(LANGUAGES)}")
            if not langs:
                raise ValueError("an empty list; leave it out to use every language")
        return langs

    @field_validator("language_weights")
    @classmethod
    def _known_weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is not None:
            unknown = sorted(set(weights) - set(LANGUAGES))
            if unknown:
                raise ValueError(f"unknown language code(s) {unknown}; accepted: {', '.join(LANGUAGES)}")
            if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
                raise ValueError("weights must be >= 0 with at least one > 0")
        return weights

    @field_validator("prices")
    @classmethod
    def _prices(cls, prices: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        bad = sorted(m for m, p in prices.items() if min(p) < 0)
        if bad:
            raise ValueError(f"negative price for {bad}; give [USD per 1M input tokens, USD per 1M output tokens]")
        return prices

    @model_validator(mode="after")
    def _backend_needs(self) -> "GenerateSettings":
        if self.backend in ("endpoint", "azure") and not self.base_url:
            raise ValueError(f"backend {self.backend!r} needs generate.base_url (the server's URL)")
        if self.budget_usd is not None and self.price() is None:
            raise ValueError(f"generate.budget_usd needs a price for model {self.model!r}: add it to generate.prices "
                             f"as [USD per 1M input tokens, USD per 1M output tokens]; known: {', '.join(PRICES)}")
        if self.min_chars >= self.max_chars:
            raise ValueError(f"generate.min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        if self.backend == "transformers" and self.prompt_style == "chat":
            raise ValueError("generate.backend 'transformers' writes completion-style prompts (a base model "
                             "continuing worked examples): use prompt_style 'completion' or 'auto'")
        if self.gguf is not None and self.backend == "llamacpp" and not os.path.isfile(self.gguf):
            raise ValueError(f"generate.gguf: no such file {self.gguf!r}")
        if self.batch_api:
            if self.backend not in HOSTED:
                raise ValueError(f"generate.batch_api needs backend 'openai' or 'azure' (the Batch API), not "
                                 f"{self.backend!r}")
            if self.prompt_style == "completion":
                raise ValueError("generate.batch_api sends chat completions: use prompt_style 'chat' or 'auto'")
            if self.time_budget_s is not None:
                raise ValueError("generate.time_budget_s does not apply with batch_api (a batch takes up to 24 h; "
                                 "stop the driver at any time and rerun to re-attach): leave it out")
        return self

    def preflight(self) -> None:
        """What the environment must give before the stage sends anything (checked when generation starts, not
        when the config loads: a train or serve job on the same config needs no API key)."""
        env = self.key_env()
        if self.backend in HOSTED and not os.environ.get(env or ""):
            from ray_e5.settings import ConfigError

            raise ConfigError(f"generate.backend: {self.backend!r} needs an API key in the environment variable "
                              f"{env} (set generate.api_key_env to read another variable)")

    # ---- derived -------------------------------------------------------------------------------------------
    def key_env(self) -> str | None:
        """The environment variable holding the API key, or None when this backend sends no key."""
        return self.api_key_env or DEFAULT_KEY_ENV.get(self.backend)

    def price(self) -> tuple[float, float] | None:
        """(USD per 1M input tokens, USD per 1M output tokens) of ``model``; the longest matching prefix wins."""
        table = {**PRICES, **self.prices}
        if self.backend in LOCAL and self.model not in self.prices:
            return (0.0, 0.0)  # local compute: no bill
        if self.model in table:
            return tuple(table[self.model])
        match = max((name for name in table if self.model.startswith(name)), key=len, default=None)
        return tuple(table[match]) if match else None

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """USD for these tokens at ``price()``; with ``batch_api``, at the Batch API's discount."""
        price = self.price()
        if price is None:
            return None
        share = self.batch_discount if self.batch_api else 1.0
        return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6 * share

    def completion_style(self) -> bool:
        return self.prompt_style == "completion" or (self.prompt_style == "auto" and self.backend in LOCAL)

    def response_format_style(self) -> str:
        if self.json_mode != "auto":
            return self.json_mode
        return "json_object_schema" if self.backend == "llamacpp" else "json_schema"
