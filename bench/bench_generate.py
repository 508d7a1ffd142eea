"""Generation throughput against the local test server with a fixed latency L and K concurrent slots.

The server's capacity is exactly K/L requests per second. Printed side by side, in one run:
  - the peer: a plain sequential loop of the official openai client (about 1/L);
  - a second peer: one asyncio loop with AsyncOpenAI and a K-wide semaphore (the best one process can do);
  - ray-e5's pipeline (`generate()`: Ray Data, autoscaling actor pool, parse, dedup, Parquet), with concurrency K:
    steady-state rate (server-side, first to last request) and end to end (wall time including the actor pool's
    start-up, planning and writing);
and the ratios to K/L (goal: pipeline >= 0.9 x K/L). With --llamacpp N it also reports completion tokens/s of the
real llama.cpp Gemma 3 270M server with the quickstart's settings for N seconds, beside the bare llama.cpp
server sent the same prompts by an openai loop: valid rows per minute and completion tokens/s.

    python bench/bench_generate.py [--latency 0.5] [--slots 16] [--examples 960] [--llamacpp 120]
"""

from __future__ import annotations

import argparse
import asyncio
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


def llamacpp_pipeline(seconds: float) -> dict:
    """The quickstart's generation settings (configs/quickstart.yaml) for ``seconds`` through ray-e5's stage (its
    own watched llama.cpp server, Ray Data, journal, filters, Parquet), then the peer: the bare llama.cpp server
    sent the same planned prompts one after another by the openai client for the same time, its answers judged
    by the same validators. Valid rows per minute and completion tokens/s of each."""
    from openai import OpenAI

    from ray_e5.config import RayE5Config, load_config
    from ray_e5.generate.backends import Completion
    from ray_e5.generate.config import GenerateSettings
    from ray_e5.generate.llamacpp import LlamaCppServer
    from ray_e5.generate.plan import expand, plan_slots
    from ray_e5.generate.prompts import answer_text
    from ray_e5.generate.run import generate
    from ray_e5.generate.completions import finish
    from ray_e5.generate.store import Store

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    section = dict(load_config(os.path.join(root, "configs", "quickstart.yaml")).generate)
    run_dir = tempfile.mkdtemp()
    config = RayE5Config.model_validate({"run_dir": run_dir, "generate": {
        **section, "time_budget_s": seconds, "progress": False}})
    start = time.perf_counter()
    manifest = generate(config).manifest
    wall = time.perf_counter() - start
    ours = {"rows_per_min": manifest["examples"] * 60 / wall,
            "tokens_per_s": manifest["tokens_this_run"]["completion"] / wall, "rows": manifest["examples"],
            "wall": wall, "drops": manifest["drops_this_run"]}

    settings = config.section("generate", GenerateSettings)
    tasks = {k: v["tasks"] for k, v in Store(f"{run_dir}/synthetic").load_brainstorm().items()}
    items, _ = expand(settings, plan_slots(settings), tasks)
    rows = tokens = 0
    with LlamaCppServer(log_path=os.path.join(run_dir, "peer-llamacpp.log")) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        start = time.perf_counter()
        for item in items:
            if time.perf_counter() - start > wall:
                break
            answer = client.completions.create(model="gemma", prompt=item["prompt"], max_tokens=item["max_tokens"],
                                               stop=["\n"], temperature=settings.temperature, top_p=settings.top_p)
            choice = answer.choices[0]
            tokens += answer.usage.completion_tokens
            result = Completion(answer_text(item["prompt"], choice.text), answer.usage.prompt_tokens,
                                answer.usage.completion_tokens, choice.finish_reason)
            rows += not finish("example", item, result, settings)["drop"]
        peer_wall = time.perf_counter() - start
    peer = {"rows_per_min": rows * 60 / peer_wall, "tokens_per_s": tokens / peer_wall, "rows": rows,
            "wall": peer_wall}
    return {"ours": ours, "peer": peer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--examples", type=int, default=960)
    parser.add_argument("--sequential", type=int, default=10, help="requests for the sequential peer")
    parser.add_argument("--llamacpp", type=float, default=0,
                        help="also run the quickstart's generation for N seconds on the real llama.cpp Gemma")
    args = parser.parse_args()

    from ray_e5.cluster import connect
    from ray_e5.config import RayE5Config
    from ray_e5.generate.run import generate
    from ray_e5.testing.openai_server import TestServer

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
        manifest = generate(config).manifest
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
        r = llamacpp_pipeline(args.llamacpp)
        ours, peer = r["ours"], r["peer"]
        print(f"llama.cpp Gemma 270M, quickstart settings, ray-e5 generate: {ours['rows_per_min']:.1f} valid rows/min, "
              f"{ours['tokens_per_s']:.1f} completion tokens/s ({ours['rows']} rows in {ours['wall']:.0f} s incl. "
              f"server and actor start-up and the brainstorm; drops {ours['drops']})")
        print(f"peer: bare llama.cpp server, same prompts, openai loop: {peer['rows_per_min']:.1f} valid rows/min, "
              f"{peer['tokens_per_s']:.1f} completion tokens/s ({peer['rows']} rows in {peer['wall']:.0f} s)")
        print(f"ratio ray-e5 / bare server: rows/min {ours['rows_per_min'] / max(peer['rows_per_min'], 1e-9):.2f}, "
              f"tokens/s {ours['tokens_per_s'] / max(peer['tokens_per_s'], 1e-9):.2f}")

if __name__ == "__main__":
    main()
