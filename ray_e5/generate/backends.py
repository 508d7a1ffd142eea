"""LLM backends behind one interface: a completion of one prompt under a JSON schema.

- hosted OpenAI / Azure OpenAI and any OpenAI-compatible endpoint (vLLM's server, llama.cpp's server): the official
  async ``openai`` client. Retries with backoff on 429/5xx/timeouts, honouring Retry-After, are the client's own
  (``max_retries``); the shared client-side rate limits and the budget are :mod:`ray_e5.generate.ledger`.
- the embedded default: llama-cpp-python's OpenAI-compatible server on the packaged Gemma 3 270M GGUF, started on a
  free loopback port, watched and stopped after (:mod:`ray_e5.generate.llamacpp`).
- vLLM inside Ray Data through ``ray.data.llm`` for GPU clusters (:func:`vllm_processor_config`).
JSON-schema constrained decoding is asked for in each backend's own dialect.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ray_e5.generate.config import GenerateSettings
from ray_e5.generate.parse import Dropped

# HTTP statuses that mean "this configuration can never work" (bad key, no access, unknown model or deployment).
FATAL_STATUSES = (401, 403, 404)
# The header that carries our content-addressed request id (servers that log it can prove a request was not repeated).
REQUEST_ID_HEADER = "X-Ray-E5-Request-Id"


def is_transient(reason: str) -> bool:
    """A drop that says nothing about the answer (the request never got one): a rerun sends it again. Every other
    drop (bad JSON, wrong keys, a 400, a duplicate) would repeat, so it is recorded and never paid for twice."""
    if reason in ("request_timeout", "request_connection_error", "request_engine_error"):
        return True
    return reason.startswith("request_http_") and (reason[-3:] in ("408", "409", "429") or reason[-3:].startswith("5"))


# A usage count at or above this is no count (and would not fit the manifest's or Parquet's integers).
MAX_TOKEN_COUNT = 1 << 31


def token_count(value) -> int | None:
    """A usage count as the server should have sent it (a non-negative integer, also as a whole float or a string of
    digits), or None for anything else: null, negative, fractional, non-finite, absurdly large, another type. A
    count we cannot read is charged as the request's reservation (:func:`ray_e5.generate.completions.charged`)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value.isascii() or not value.isdigit() or len(value) > 10:
            return None
        value = int(value)
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        value = int(value)
    elif not isinstance(value, int):
        return None
    return value if 0 <= value < MAX_TOKEN_COUNT else None


@dataclass
class Completion:
    """An answer: its text, and its usage counts (None where the server sent none we can read)."""

    text: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None = None


def envelope_answer(choices, usage, completion_text: bool = False) -> tuple[str | None, int | None, int | None,
                                                                            str | None]:
    """(text, prompt tokens, completion tokens, finish reason) of a chat completion's ``choices`` and ``usage``, as
    attributes (the openai client's objects, which it builds without validating) or as dict keys (a Batch API output
    line). A body that is not a chat completion (no choice, a choice without a message, content that is not text)
    raises :class:`Dropped` ``request_bad_response``."""

    def get(obj, name):
        return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

    if not isinstance(choices, list) or not choices:
        raise Dropped("request_bad_response")
    choice = choices[0]
    if completion_text:
        text = get(choice, "text")
    else:
        message = get(choice, "message")
        if message is None or isinstance(message, (str, int, float, list)):
            raise Dropped("request_bad_response")
        text = get(message, "content")  # null when the model refused: an empty answer
    if text is not None and not isinstance(text, str):
        raise Dropped("request_bad_response")
    finish_reason = get(choice, "finish_reason")
    return (text, token_count(get(usage, "prompt_tokens")), token_count(get(usage, "completion_tokens")),
            finish_reason if isinstance(finish_reason, str) else None)


def response_format(style: str, schema: dict) -> dict | None:
    """The ``response_format`` that constrains decoding to ``schema`` in a server's dialect."""
    if style == "json_schema":  # OpenAI, Azure OpenAI, vLLM's server
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    if style == "json_object_schema":  # llama-cpp-python's server (grammar from the schema)
        return {"type": "json_object", "schema": schema}
    if style == "json_object":
        return {"type": "json_object"}
    return None


class ChatBackend:
    """Chat completions through the official async openai client, against any OpenAI-compatible server."""

    def __init__(self, settings: GenerateSettings, base_url: str | None = None, api_key: str | None = None):
        import openai

        self.settings = settings
        # Our own llama.cpp server on loopback has no rate limits to wait out: a failed call means it is gone, and
        # one quick retry lets the stage see that (and stop with the server's exit) within a second or two.
        retries = min(settings.max_retries, 1) if settings.backend == "llamacpp" else settings.max_retries
        common = dict(api_key=api_key or "EMPTY", max_retries=retries, timeout=settings.request_timeout_s)
        if settings.backend == "azure":
            self.client = openai.AsyncAzureOpenAI(azure_endpoint=settings.base_url,
                                                  api_version=settings.azure_api_version, **common)
        else:
            self.client = openai.AsyncOpenAI(base_url=base_url or settings.base_url, **common)
        self.style = settings.response_format_style()

    async def complete(self, prompt: str, schema: dict, max_tokens: int, request_id: str | None = None) -> Completion:
        """One chat completion; a failed call raises :class:`Dropped` with a reason (never the server's text,
        which could echo a key)."""
        import openai

        kwargs = {"extra_headers": {REQUEST_ID_HEADER: request_id}} if request_id else {}
        fmt = response_format(self.style, schema)
        if fmt:
            kwargs["response_format"] = fmt
        completion = self.settings.completion_style()
        try:
            if completion:  # a base model continues our few-shot document to the end of the answer's line
                kwargs.pop("response_format", None)
                response = await self.client.completions.create(
                    model=self.settings.model, prompt=prompt, max_tokens=max_tokens, stop=["\n"],
                    temperature=self.settings.temperature, top_p=self.settings.top_p, **kwargs)
            else:
                response = await self.client.chat.completions.create(
                    model=self.settings.model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=self.settings.temperature, top_p=self.settings.top_p, **kwargs)
        except openai.APITimeoutError:
            raise Dropped("request_timeout") from None
        except openai.APIStatusError as err:
            raise Dropped(f"request_http_{err.status_code}") from None
        except openai.APIConnectionError:
            raise Dropped("request_connection_error") from None
        except Exception:  # a body the client could not decode, and the like: dropped and counted, never fatal
            raise Dropped("request_bad_response") from None
        # A 200 whose body is not a chat completion: the client builds its objects without validating them.
        text, prompt_tokens, completion_tokens, finish_reason = envelope_answer(
            getattr(response, "choices", None), getattr(response, "usage", None), completion_text=bool(completion))
        if completion:
            from ray_e5.generate.prompts import answer_text

            text = answer_text(prompt, text)
        return Completion(text, prompt_tokens, completion_tokens, finish_reason)

    async def aclose(self) -> None:
        await self.client.close()


# ---- vLLM in Ray Data (GPU clusters) ----------------------------------------------------------------------------
# Checked against the installed ray.data.llm (ray/llm/_internal/batch/stages/vllm_engine_stage.py):
# - input: ``messages`` (the chat-template stage writes ``prompt`` from them) or ``prompt`` with the chat template
#   off; ``sampling_params`` becomes ``vllm.SamplingParams(**sampling_params)`` after its ``structured_outputs`` dict
#   is popped into ``vllm.sampling_params.StructuredOutputsParams(**structured_outputs)`` (key ``json``: a schema,
#   as a dict or a JSON string);
# - output (``vLLMOutputData``): ``generated_text``, ``num_input_tokens``, ``num_generated_tokens``, the input columns
#   carried over; a row that failed comes back with a non-empty ``__inference_error__`` and bypasses postprocess.
# The schema travels as a JSON string: rows go through Arrow, where a nested dict column of schemas with different
# keys would be unified into one struct type (every schema gaining the others' keys as nulls).
VLLM_OUTPUT_COLUMNS = ("generated_text", "num_input_tokens", "num_generated_tokens", "__inference_error__")
# A planned request may cross the processor as one JSON string (``ray_e5_item``, with ``ray_e5_phase``), so that
# brainstorm and example requests (different columns) can share one dataset and keep one schema.
ITEM_COLUMN, PHASE_COLUMN = "ray_e5_item", "ray_e5_phase"


def vllm_processor_config(settings: GenerateSettings):
    """The ``ray.data.llm`` vLLM engine processor config: ``vllm.concurrency`` engine replicas of
    ``tensor_parallel_size`` GPUs each; a row that fails comes back with ``__inference_error__`` instead of
    failing the job. A base-model writer (completion-style prompts) gets no chat template."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = settings.vllm
    return vLLMEngineProcessorConfig(
        model_source=v.model, concurrency=v.concurrency, batch_size=v.batch_size,
        accelerator_type=v.accelerator_type, should_continue_on_error=True,
        chat_template_stage=not settings.completion_style(),
        engine_kwargs={"tensor_parallel_size": v.tensor_parallel_size, "max_model_len": v.max_model_len,
                       "gpu_memory_utilization": v.gpu_memory_utilization, "enable_prefix_caching": True})


def vllm_request(settings: GenerateSettings, item: dict) -> dict:
    """The vLLM stage's input for one planned request (``prompt``, ``schema`` as JSON, ``max_tokens``): chat
    messages (or the raw prompt for a completion-style base model, cut at the end of the answer's line) and sampling
    parameters with structured (JSON-schema) outputs."""
    sampling: dict = {"temperature": settings.temperature, "top_p": settings.top_p, "max_tokens": int(item["max_tokens"])}
    if settings.completion_style():
        sampling["stop"] = ["\n"]
        return {"prompt": item["prompt"], "sampling_params": sampling}
    if settings.json_mode != "off":
        schema = item["schema"]
        sampling["structured_outputs"] = {"json": schema if isinstance(schema, str) else json.dumps(schema)}
    return {"messages": [{"role": "user", "content": item["prompt"]}], "sampling_params": sampling}


def vllm_preprocess(settings: GenerateSettings):
    """Preprocess for the processor: a row holding a planned request (its own columns, or as JSON in
    ``ray_e5_item`` with its phase) becomes the vLLM stage's input, the request kept alongside."""

    def preprocess(row: dict) -> dict:
        if ITEM_COLUMN not in row:  # a planned request as the row itself
            return {**row, **vllm_request(settings, row)}
        return {ITEM_COLUMN: row[ITEM_COLUMN], PHASE_COLUMN: row[PHASE_COLUMN],
                **vllm_request(settings, json.loads(row[ITEM_COLUMN]))}

    return preprocess


def vllm_postprocess(row: dict) -> dict:
    """The vLLM stage's output reduced to the request and the columns :func:`vllm_completion` reads (rows that
    failed bypass this and keep every column)."""
    if ITEM_COLUMN not in row:
        return {**{k: v for k, v in row.items() if k not in ("messages", "sampling_params")}, "__inference_error__": ""}
    return {ITEM_COLUMN: row[ITEM_COLUMN], PHASE_COLUMN: row[PHASE_COLUMN], "generated_text": row.get("generated_text"),
            "num_input_tokens": int(row.get("num_input_tokens") or 0),
            "num_generated_tokens": int(row.get("num_generated_tokens") or 0), "__inference_error__": ""}


def vllm_completion(row: dict, settings: GenerateSettings | None = None) -> Completion | Dropped:
    if row.get("__inference_error__"):
        return Dropped("request_engine_error")
    text = row.get("generated_text")
    if settings is not None and settings.completion_style() and text is not None:
        from ray_e5.generate.prompts import answer_text

        prompt = json.loads(row[ITEM_COLUMN])["prompt"] if ITEM_COLUMN in row else row.get("prompt", "")
        text = answer_text(prompt, text)
    return Completion(text, int(row.get("num_input_tokens") or 0), int(row.get("num_generated_tokens") or 0))


_PROCESSORS: dict[str, object] = {}


def vllm_processor(settings: GenerateSettings):
    """The processor for these settings (``vllm.engine: batch``), built once and reused by both phases.

    ray.data.llm starts the engine actors per dataset execution, so the engines load once per phase; the default
    ``engine: serve`` keeps one engine set for both (:mod:`ray_e5.generate.vllm_server`).
    """
    key = settings.model_dump_json()
    if key not in _PROCESSORS:
        from ray.data.llm import build_processor

        _PROCESSORS[key] = build_processor(vllm_processor_config(settings), preprocess=vllm_preprocess(settings),
                                           postprocess=vllm_postprocess)
    return _PROCESSORS[key]
