"""Generation throughput against the local test server with a fixed latency L and K concurrent slots.

The physical limit is K/L requests per second. Prints the pipeline's rate (Ray Data actor pool, bounded
concurrency), a plain sequential openai loop (the naive peer), and the ratios (goal: pipeline >= 0.9 x K/L).
Optionally (--llamacpp N) also tokens/s of the real llama.cpp Gemma 270M backend on N examples.

    python bench/bench_generate.py [--latency 0.5] [--slots 16] [--examples 320] [--llamacpp 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--examples", type=int, default=320)
    parser.add_argument("--sequential", type=int, default=10, help="requests for the sequential peer")
    parser.add_argument("--llamacpp", type=int, default=0, help="also time N examples on the real llama.cpp Gemma")
    args = parser.parse_args()

    from openai import OpenAI

    from ray_e5.cluster import connect
    from ray_e5.config import RayE5Config
    from ray_e5.synth.run import generate
    from ray_e5.synth.testserver import TestServer

    connect(None)
    limit = args.slots / args.latency
    with TestServer(latency_s=args.latency, slots=args.slots) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        start = time.perf_counter()
        for _ in range(args.sequential):
            client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
        sequential = args.sequential / (time.perf_counter() - start)

        run_dir = tempfile.mkdtemp()
        config = RayE5Config.model_validate({"run_dir": run_dir, "generate": {
            "backend": "endpoint", "base_url": server.base_url, "model": "test-model", "num_examples": args.examples,
            "mix": {"sts": 1}, "concurrency": args.slots, "near_duplicate_threshold": 0.95}})
        start = time.perf_counter()
        manifest = generate(config)
        wall = time.perf_counter() - start
    requests = manifest["examples"] + sum(manifest["drops_this_run"].values())
    rate = requests / wall
    print(f"machine: {os.cpu_count()} CPU cores; test server latency {args.latency} s, {args.slots} slots "
          f"-> limit K/L = {limit:.1f} req/s")
    print(f"sequential openai loop : {sequential:7.2f} req/s")
    print(f"ray-e5 pipeline        : {rate:7.2f} req/s ({requests} requests in {wall:.1f} s, incl. start-up)")
    print(f"ratio pipeline / limit = {rate / limit:.2f} (goal >= 0.9); pipeline / sequential = {rate / sequential:.1f}x")

    if args.llamacpp:
        config = RayE5Config.model_validate({"run_dir": tempfile.mkdtemp(), "generate": {
            "backend": "llamacpp", "num_examples": args.llamacpp, "mix": {"sts": 1}, "languages": ["en"],
            "max_tokens": 160, "concurrency": 1}})
        start = time.perf_counter()
        manifest = generate(config)
        wall = time.perf_counter() - start
        print(f"llama.cpp Gemma 270M: {manifest['tokens']['completion'] / wall:.1f} completion tokens/s over "
              f"{wall:.0f} s (server start-up included), {manifest['examples']} valid of {args.llamacpp}")


if __name__ == "__main__":
    main()
