"""The Batch API path (``generate.batch_api``) on a large plan against the local test server (run in its own
process, so its memory is not counted as the driver's).

Printed side by side, in one run, for the same planned requests (fixed-task kinds: no brainstorm phase):
  - ray-e5's submit (``BatchPhase._submit``): each part streamed line by line to a temporary file and uploaded from
    it (``files.create``), then ``batches.create``: requests per second to prepare and upload, and the driver's
    peak RSS above the plan itself;
  - the peer: the usual notebook recipe, each part's JSONL built in memory (a list of lines joined to bytes) and
    uploaded as bytes: the same two figures;
  - ray-e5's collect (``BatchPhase.rows`` re-attaching to the submitted batches): polls, output files streamed and
    parsed by ``stage.finish``: rows per second and peak RSS above the plan (rows are consumed, as run.py writes
    them to shards).
The plan (``expand``) is held in memory by run.py either way; its own RSS is printed first.

    python bench/bench_batch_api.py [--requests 100000] [--part-requests 50000] [--part-mb 200] [--paper-mix]

``--paper-mix``: the paper's mix of six kinds (longer prompts), with stand-in brainstorm tasks.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENAI_API_KEY", "sk-bench")


class PeakRSS:
    """Samples this process's RSS every 10 ms while in the block; ``peak`` in bytes."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ray_e5.testing.openai_server", "--port", str(port), "--batch-polls",
                             "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "test server on" not in line:
        proc.kill()
        raise RuntimeError(f"the test server did not start: {line}")
    return proc, f"http://127.0.0.1:{port}/v1"


def peer_upload(client, settings, items) -> int:
    """Each part built in memory and uploaded as bytes (then submitted): the in-memory recipe."""
    from ray_e5.generate.batch_api import request_line

    parts = 0
    for start in range(0, len(items), settings.batch_max_requests):
        lines = [request_line(item, settings) for item in items[start:start + settings.batch_max_requests]]
        data = b"".join(lines)
        del lines
        uploaded = client.files.create(file=(f"peer-{parts}.jsonl", data), purpose="batch", timeout=600)
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        del data
        parts += 1
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--part-requests", type=int, default=50_000)
    parser.add_argument("--part-mb", type=float, default=200)
    parser.add_argument("--paper-mix", action="store_true", help="the paper's six kinds, stand-in brainstorm tasks")
    args = parser.parse_args()

    from ray_e5.generate.batch_api import BatchPhase, make_client
    from ray_e5.generate.config import GenerateSettings
    from ray_e5.generate.plan import brainstorm_requests, expand, plan_slots

    server, base_url = start_server()
    try:
        settings = GenerateSettings(backend="openai", base_url=base_url, model="gpt-4o-mini",
                                    num_examples=args.requests, batch_api=True,
                                    **({} if args.paper_mix else {"mix": {"sts": 1, "bitext": 1}}),
                                    batch_max_requests=args.part_requests,
                                    batch_max_bytes=int(args.part_mb * 1e6), batch_poll_s=0.2, batch_poll_max_s=1.0,
                                    progress=False, request_timeout_s=600)
        start_rss = rss()
        t = time.perf_counter()
        slots = plan_slots(settings)
        tasks = {r["key"]: [f"Given a query about subject {r['key']} number {i}, retrieve documents that answer it."
                            for i in range(20)] for r in brainstorm_requests(settings, slots)}
        items, _ = expand(settings, slots, tasks)
        plan_s, plan_rss = time.perf_counter() - t, rss()
        size = sum(len(i["prompt"]) for i in items)
        print(f"plan: {len(items)} requests ({size / 1e6:.0f} MB of prompts) in {plan_s:.1f} s; "
              f"RSS {start_rss / 2**20:.0f} -> {plan_rss / 2**20:.0f} MiB (held by run.py either way)", flush=True)

        out = tempfile.mkdtemp(prefix="bench-batch-")
        client = make_client(settings)
        with PeakRSS() as ours_mem:
            base = rss()
            t = time.perf_counter()
            refused = list(BatchPhase(settings, out, "example", client=client)._submit(items, 0))
            ours_s = time.perf_counter() - t
        assert not refused, refused[:1]
        ours_peak = ours_mem.peak - base

        with PeakRSS() as peer_mem:
            base = rss()
            t = time.perf_counter()
            peer_upload(client, settings, items)
            peer_s = time.perf_counter() - t
        peer_peak = peer_mem.peak - base

        with PeakRSS() as collect_mem:
            base = rss()
            t = time.perf_counter()
            valid = total = 0
            for row in BatchPhase(settings, out, "example", client=client).rows(items):
                total += 1
                valid += not row["drop"]
            collect_s = time.perf_counter() - t
        collect_peak = collect_mem.peak - base

        n = len(items)
        print(f"prepare+upload+submit  ray-e5 (streamed to disk): {n / ours_s:8.0f} req/s  peak RSS +"
              f"{ours_peak / 2**20:6.0f} MiB")
        print(f"prepare+upload+submit  peer (JSONL in memory):    {n / peer_s:8.0f} req/s  peak RSS +"
              f"{peer_peak / 2**20:6.0f} MiB")
        print(f"ratio ray-e5/peer: speed {peer_s / ours_s:.2f}x, peak memory {ours_peak / max(1, peer_peak):.2f}x")
        print(f"poll+download+parse    ray-e5 (streamed):         {total / collect_s:8.0f} rows/s peak RSS +"
              f"{collect_peak / 2**20:6.0f} MiB  ({valid} valid of {total})")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
