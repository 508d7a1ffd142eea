"""One writer per stage and run directory (ray_e5.lease), on a local disk and on moto's S3 server on loopback: a
live lease refuses a second driver naming its holder, an expired or dead one is taken over, conditional writes
let only one of two racing drivers win, and two real `generate` drivers never send one request twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from ray_e5.lease import Lease, LeaseHeldError, _Conflict, hold_lease

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "run")
    moto = request.getfixturevalue("moto")
    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    return f"s3://runs/{uuid.uuid4().hex[:8]}"


def _record(holder: dict, heartbeat_at: float, ttl_s: float = 30.0) -> bytes:
    return json.dumps({"stage": "generate", "token": "someone-else", "holder": holder, "taken_at": heartbeat_at - 5,
                       "heartbeat_at": heartbeat_at, "expires_at": heartbeat_at + ttl_s, "ttl_s": ttl_s,
                       "released_at": None}).encode()


def test_conditional_writes_let_one_of_two_racers_win(run_dir):
    """The store's compare-and-swap: on S3 this is moto honouring If-None-Match: * and If-Match: <etag>."""
    a, b = Lease(run_dir, "generate"), Lease(run_dir, "generate")
    first = a.store.create(b'{"n": 1}')
    with pytest.raises(_Conflict):
        b.store.create(b'{"n": 2}')  # exists already
    second = a.store.replace(b'{"n": 3}', first)
    with pytest.raises(_Conflict):
        b.store.replace(b'{"n": 4}', first)  # a version that is no longer current
    assert a.store.read() == ({"n": 3}, second) and second != first


def test_live_lease_refuses_naming_its_holder_stale_and_dead_ones_are_taken_over(run_dir, capsys):
    store = Lease(run_dir, "generate").store
    live = _record({"job_id": "raysubmit_Abc123", "host": "node-7", "pid": 4242}, time.time())
    version = store.create(live)
    with pytest.raises(LeaseHeldError) as refused:
        Lease(run_dir, "generate").acquire()
    text = str(refused.value)
    assert "Ray job raysubmit_Abc123 (host node-7, pid 4242)" in text and "expires at" in text
    assert "ray job stop raysubmit_Abc123" in text and "UTC" in text
    assert store.read()[0]["token"] == "someone-else"  # untouched

    # its heartbeat stopped a minute ago: taken over
    version = store.replace(_record({"job_id": None, "host": "node-7", "pid": 4242}, time.time() - 60), version)
    taker = Lease(run_dir, "generate").acquire()
    assert store.read()[0]["token"] == taker.token
    assert "took over the generate lease of host node-7, pid 4242" in capsys.readouterr().out
    with pytest.raises(LeaseHeldError, match=rf"host {os.uname().nodename}, pid {os.getpid()}"):
        Lease(run_dir, "generate").acquire()  # now ours, live: a second driver is refused
    taker.renew()
    taker.release()
    again = Lease(run_dir, "generate").acquire()  # released: free at once
    again.release()

    # a live-looking lease whose holder ran on this host and is gone (a driver killed with SIGKILL)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from ray_e5.lease import holder_identity

    holder = {**holder_identity(), "pid": int(dead.stdout)}
    store.replace(_record(holder, time.time()), store.read()[1])
    Lease(run_dir, "generate").acquire()
    assert f"pid {holder['pid']}: its process is gone" in capsys.readouterr().out


def test_a_lease_taken_over_meanwhile_is_lost_not_overwritten(tmp_path):
    run = str(tmp_path / "run")
    with hold_lease(run, "train", ttl_s=30) as lease:
        store = lease.store
        store.replace(_record({"job_id": None, "host": "elsewhere", "pid": 1}, time.time()), store.read()[1])
        lease.renew()  # its heartbeat finds another holder: lost, and the other's record is kept
        assert lease.lost and "host elsewhere, pid 1 holds it now" in lease.lost
    assert store.read()[0]["holder"]["host"] == "elsewhere"


# ---- two real generate drivers on one run directory -------------------------------------------------------------
_DRIVER = ("import json, sys; from ray_e5.config import RayE5Config; from ray_e5.generate.run import generate; "
           "generate(RayE5Config.model_validate(json.loads(sys.argv[1])))")


@pytest.mark.slow
@pytest.mark.cluster  # the s3 variant's first driver starts a local Ray of its own
def test_two_generate_drivers_never_send_one_request_twice(run_dir, ray_cluster, tmp_path, monkeypatch):
    from ray_e5.config import RayE5Config
    from ray_e5.generate.run import generate
    from ray_e5.testing.openai_server import TestServer

    remote = run_dir.startswith("s3://")
    # A remote run dir: the first driver starts its own Ray, whose workers inherit the S3 variables set here.
    address = None if remote else ray_cluster.get_runtime_context().gcs_address
    if remote:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with TestServer(latency_s=1.0, slots=1) as server:
        gen = {"backend": "endpoint", "base_url": server.base_url, "model": "test-model", "num_examples": 4,
               "concurrency": 1, "mix": {"short-short": 1}, "request_timeout_s": 60.0, "progress": False}
        config = RayE5Config.model_validate({"run_dir": run_dir, "generate": gen})
        log = open(tmp_path / "first.log", "wb")
        first = subprocess.Popen([sys.executable, "-c", _DRIVER,
                                  json.dumps({**config.model_dump(), "ray_address": address})],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            store = Lease(run_dir, "generate").store
            while first.poll() is None and (store.read()[0] or {}).get("holder", {}).get("pid") != first.pid:
                time.sleep(0.2)
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            with pytest.raises(LeaseHeldError) as refused:
                generate(config)  # the second driver, while the first runs
            assert first.poll() is None  # still running: the refusal was against a live holder
            print("second driver:", refused.value)
            assert f"pid {first.pid})" in str(refused.value) or f"pid {first.pid} " in str(refused.value)
            assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
            log.close()
        answered = Counter(c.request_id for c in server.calls if c.answered)
    assert len(answered) >= 4 and max(answered.values()) == 1, answered
    Lease(run_dir, "generate").acquire().release()  # the first driver released its lease when it ended
