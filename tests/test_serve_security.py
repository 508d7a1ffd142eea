"""Serving that cannot fail open or be held: auth on hostile credential headers, the API key on a real `ray start`
cluster whose processes never saw it, Serve's cluster-wide HTTP options, per-request token bounds, slow-body clients,
and the work of timed-out requests dropped. Real HTTP on 127.0.0.1, the tiny decoder behind Ray Serve."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from ray_e5.net import free_port
from ray_e5.serve.config import ServeSettings
from ray_e5.testing.cluster import end_processes

KEY = "s3cret-key-for-tests"
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _small(**over) -> ServeSettings:
    base = dict(model_name="tiny", num_cpus=0.25, api_key_env=None, max_inputs_per_request=2048,
                access_log=False)
    return ServeSettings(**{**base, **over})


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_decoder_dir):
    from ray import serve

    from ray_e5.serve.app import build_app, start_serve

    port = free_port()
    start_serve(ServeSettings(host="127.0.0.1", port=port))
    apps = [
        ("auth", "/auth", _small(), SecretStr(KEY)),
        ("bounds", "/bounds", _small(max_tokens_per_request=64, body_read_timeout_s=2.0), None),
        # one text per sub-batch and a short timeout: a big request times out while its batch computes
        ("drop", "/drop", _small(max_batch_tokens=48, request_timeout_s=0.5, batch_wait_timeout_s=0,
                                 max_tokens_per_request=10**6), None),
    ]
    serve.run_many([serve.RunTarget(build_app(s, str(tiny_decoder_dir), key), name=name, route_prefix=prefix)
                    for name, prefix, s, key in apps])
    yield f"http://127.0.0.1:{port}", port
    serve.shutdown()


def _raw(port: int, request: bytes, timeout: float = 10.0) -> int:
    """Send raw bytes as an HTTP request; the status code answered (0 when the connection closed unanswered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _post(path: str, auth_lines: list[bytes], body: bytes = b'{"model": "tiny", "input": "hello"}') -> bytes:
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(), b"Connection: close", *auth_lines]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def test_every_credential_shape_gets_401_or_400_and_only_the_key_gets_in(server):
    base, port = server
    key = KEY.encode()
    hostile = {
        "none": [],
        "empty": [b"Authorization: "],
        "Bearer alone": [b"Authorization: Bearer"],
        "Bearer and a space": [b"Authorization: Bearer "],
        "wrong key": [b"Authorization: Bearer wrong"],
        "key prefix": [b"Authorization: Bearer " + key[:-1]],
        "key plus a byte": [b"Authorization: Bearer " + key + b"x"],
        "non-ASCII UTF-8 token": [b"Authorization: Bearer " + "clé-ключ-鍵".encode()],
        "latin-1 bytes": [b"Authorization: Bearer \xe9\xff\xfe" + key],
        "other scheme": [b"Authorization: Basic " + key],
        "scheme only, no space": [b"Authorization: Bearer" + key],
        "key without scheme": [b"Authorization: " + key],
        "two headers": [b"Authorization: Bearer " + key, b"Authorization: Bearer " + key],
        "huge (64 KiB)": [b"Authorization: Bearer " + b"A" * 65536],
        "NUL byte": [b"Authorization: Bearer \x00" + key],
    }
    got = {name: _raw(port, _post("/auth/v1/embeddings", lines)) for name, lines in hostile.items()}
    print("hostile credential -> status:", got)
    assert all(status in (400, 401, 431) for status in got.values()), got
    assert list(got.values()).count(401) >= 10, got
    accepted = {name: _raw(port, _post("/auth/v1/embeddings", [line])) for name, line in {
        "Bearer key": b"Authorization: Bearer " + key, "bearer (lower case)": b"Authorization: bearer " + key,
        "several spaces": b"Authorization: Bearer    " + key}.items()}
    print("right key -> status:", accepted)
    assert set(accepted.values()) == {200}, accepted
    assert httpx.get(f"{base}/auth/v1/models").status_code == 401
    ok = httpx.post(f"{base}/auth/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": "tiny", "input": ["a", "b"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2 and len(ok.json()["data"][0]["embedding"]) > 0


def test_a_request_over_the_token_bound_gets_413_naming_the_key(server):
    base, _ = server
    fine = httpx.post(f"{base}/bounds/v1/embeddings", json={"model": "tiny", "input": ["short one"]})
    assert fine.status_code == 200, fine.text
    over = httpx.post(f"{base}/bounds/v1/embeddings", json={"model": "tiny", "input": ["words and more words"] * 40})
    assert over.status_code == 413, over.text
    err = over.json()["error"]
    assert "serve.max_tokens_per_request" in err["message"] and err["param"] == "input"
    assert err["code"] == "request_too_many_tokens"


async def _slow_client(port: int, stop: float) -> int:
    """Headers at once, then the body a byte every 0.3 s: the status answered (0: none before ``stop``)."""
    body = b'{"model": "tiny", "input": "' + b"x" * 200 + b'"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_post("/bounds/v1/embeddings", [], body)[:-len(body)])
        await writer.drain()
        sent = 0
        while time.monotonic() < stop:
            try:
                line = await asyncio.wait_for(reader.readline(), 0.3)
            except asyncio.TimeoutError:
                if sent < len(body) - 1:  # never the last byte: the body never completes
                    try:
                        writer.write(body[sent:sent + 1])
                        await writer.drain()
                    except ConnectionError:
                        return 0
                    sent += 1
                continue
            parts = line.split(b" ")
            return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return 0
    except ConnectionError:
        return 0
    finally:
        writer.close()


def test_slow_body_clients_are_cut_off_and_a_good_request_is_answered(server):
    base, port = server
    clients = 64

    async def flood():
        stop = time.monotonic() + 12
        slow = [asyncio.create_task(_slow_client(port, stop)) for _ in range(clients)]
        await asyncio.sleep(1.0)  # every slow client is connected and dribbling
        async with httpx.AsyncClient(timeout=60) as client:
            began = time.monotonic()
            good = await client.post(f"{base}/bounds/v1/embeddings", json={"model": "tiny", "input": ["good"]})
            waited = time.monotonic() - began
        return good, waited, await asyncio.gather(*slow)

    good, waited, statuses = asyncio.run(flood())
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"{clients} slow-body clients; the good request waited {waited:.2f} s; slow clients' answers: {counts}")
    assert good.status_code == 200 and len(good.json()["data"][0]["embedding"]) > 0, good.text
    assert counts.get(408, 0) > 0, counts  # the body deadline cut them off (no answer at all would mean held slots)
    health = httpx.get(f"{base}/bounds/health").json()
    assert health["status"] == "ok"


def test_the_work_of_timed_out_requests_is_dropped(server):
    """A request that times out while its batch computes: its remaining sub-batches are skipped (counted), and the
    request queued behind it gets the model instead of waiting for work nobody will read. (Requests that time out
    while still queued are never batched: tests/test_serve_batching.py counts those.)"""
    base, _ = server
    texts = [f"text number {i} with a few words to embed" for i in range(1500)]

    async def two():
        async with httpx.AsyncClient(timeout=60) as client:
            big = asyncio.create_task(client.post(f"{base}/drop/v1/embeddings", json={"model": "tiny", "input": texts}))
            await asyncio.sleep(0.2)  # the big one computes: this one queues behind it
            queued = await client.post(f"{base}/drop/v1/embeddings", json={"model": "tiny", "input": ["queued"]})
            return await big, queued

    big, queued = asyncio.run(two())
    assert big.status_code == 504 and "serve.request_timeout_s" in big.json()["error"]["message"], big.text
    time.sleep(0.5)  # the skipped texts are counted when the forward returns
    queue = httpx.get(f"{base}/drop/health").json()["queue"]
    print(f"dropped {queue['dropped_texts']} of {len(texts)} texts of the timed-out request; the request queued "
          f"behind it got {queued.status_code}")
    assert queue["dropped_texts"] > 0, queue
    for attempt in range(10):  # the replica is free again: a small request is answered
        after = httpx.post(f"{base}/drop/v1/embeddings", json={"model": "tiny", "input": ["after"]})
        if after.status_code == 200:
            break
    print(f"a small request after the drop answered on attempt {attempt + 1}")
    assert after.status_code == 200, after.text


def test_serve_refuses_to_start_where_serve_already_listens_elsewhere(server):
    from ray_e5.generate.config import GenerateSettings
    from ray_e5.generate.errors import BackendError
    from ray_e5.generate.vllm_server import VllmServer
    from ray_e5.serve.app import start_serve
    from ray_e5.serve.instance import ServeConflict, running_http_options

    _, port = server
    assert running_http_options() == ("127.0.0.1", port)
    start_serve(ServeSettings(host="localhost", port=port))  # the same address: accepted
    other = free_port()
    with pytest.raises(ServeConflict, match=rf"HTTP on 127\.0\.0\.1:{port}, but serve\.host/serve\.port ask for "
                                            rf"127\.0\.0\.1:{other}"):
        start_serve(ServeSettings(host="127.0.0.1", port=other))
    with pytest.raises(ServeConflict, match=r"ask for 0\.0\.0\.0"):
        start_serve(ServeSettings(host="0.0.0.0", port=port, allow_unauthenticated=True))
    writer = VllmServer(GenerateSettings.model_validate(
        {"backend": "vllm", "vllm": {"model": "mistralai/Mistral-7B-Instruct-v0.3", "serve_port": other}}))
    with pytest.raises(BackendError, match=rf"127\.0\.0\.1:{port}.*generate\.vllm\.serve_port"):
        writer._start_serve()
    assert running_http_options() == ("127.0.0.1", port)  # nothing was restarted


def test_no_key_on_a_network_host_is_refused_naming_both_keys(monkeypatch):
    monkeypatch.delenv("RAY_E5_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"serve\.api_key.*RAY_E5_API_KEY.*serve\.allow_unauthenticated: true"):
        ServeSettings(host="0.0.0.0").check_exposure(ServeSettings(host="0.0.0.0").resolve_api_key())
    ServeSettings(host="0.0.0.0", allow_unauthenticated=True).check_exposure(None)
    ServeSettings(host="::1").check_exposure(None)
    monkeypatch.setenv("RAY_E5_API_KEY", "from-env")
    key = ServeSettings(host="0.0.0.0").resolve_api_key()
    assert key is not None and key.get_secret_value() == "from-env" and "from-env" not in repr(key)
    assert ServeSettings(api_key="in-config").resolve_api_key().get_secret_value() == "in-config"


# ---- a real `ray start` cluster whose processes never saw the key ----------------------------------------------
@pytest.fixture(scope="module")
def head(tiny_decoder_dir):
    """A head started with `ray start --head` (own port, temp dir, 2 CPUs, no dashboard) from an environment
    without RAY_E5_API_KEY; stopped by killing exactly its processes (their command lines name its temp dir)."""
    import psutil

    temp = Path(tempfile.mkdtemp(prefix="re5s_", dir="/tmp"))  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_E5_API_KEY", "RAY_ADDRESS")}
    # Ray's own token auth with a token of this cluster's (~/.ray/auth_token is shared by every cluster on the machine)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex})
    env.update({"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())})
    port = free_port()
    ports = [arg for name in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
                              "--ray-client-server-port") for arg in (name, str(free_port()))]
    started = subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(port), "--temp-dir", str(temp),
                              "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                              "--node-ip-address", "127.0.0.1",
                              "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats", *ports],
                             env=env, start_new_session=True, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"address": f"127.0.0.1:{port}", "env": env, "temp": temp, "model": str(tiny_decoder_dir)}
    finally:
        for _ in range(3):
            procs = []
            for p in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if p.info["pid"] != os.getpid() and any(str(temp) in part for part in p.info["cmdline"] or []):
                        procs += [*p.children(recursive=True), p]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if not procs:
                break
            end_processes(procs)
        shutil.rmtree(temp, ignore_errors=True)


def _serve_driver(head: dict, http_port: int, key: str, log: Path) -> subprocess.Popen:
    """`ray-e5 serve --address ...` with RAY_E5_API_KEY set in its (the driver's) environment only."""
    env = {**head["env"], "RAY_E5_API_KEY": key}
    args = [str(BIN / "ray-e5"), "serve", "--address", head["address"], "--model", head["model"],
            "--port", str(http_port), "--set", "serve.model_name=tiny", "--set", "serve.num_cpus=0.5",
            "--set", "serve.access_log=false"]
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, times: int, timeout: float = 240) -> None:
    """Wait until ``text`` is in the log ``times`` times (the drivers share one log)."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < times:
        assert proc.poll() is None, f"ray-e5 serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in the log after {timeout:.0f} s:\n{log.read_text()[-4000:]}"
        time.sleep(1)


def _status(url: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(url, headers=headers, json={"model": "tiny", "input": ["on the real cluster"]}, timeout=60).status_code


@pytest.mark.slow
@pytest.mark.cluster
def test_the_drivers_key_is_enforced_on_a_ray_start_cluster_and_rotates(head, tmp_path):
    from openai import OpenAI

    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}/v1/embeddings"
    log = tmp_path / "serve.log"
    drivers = []
    try:
        for key, old in (("first-key", None), ("rotated-key", "first-key")):
            drivers.append(_serve_driver(head, http_port, key, log))
            _wait_for_line(log, f"serving tiny at http://127.0.0.1:{http_port}/v1", drivers[-1], len(drivers))
            assert "API key auth is ON (key from $RAY_E5_API_KEY)" in log.read_text()
            got = {"no key": _status(url, None), "wrong key": _status(url, "wrong"), "right key": _status(url, key)}
            if old is not None:
                got["the key before rotation"] = _status(url, old)
            print(f"key {key!r}: {got}")
            assert got.pop("right key") == 200 and set(got.values()) == {401}, got
            vector = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=key, max_retries=0).embeddings.create(
                model="tiny", input=["a real embedding"]).data[0].embedding
            assert len(vector) > 0 and any(v != 0 for v in vector)
            drivers[-1].terminate()  # the app outlives its driver, as on a real cluster
            drivers[-1].wait(30)
        assert KEY not in log.read_text() and "first-key" not in log.read_text()  # never logged
    finally:
        for proc in drivers:
            if proc.poll() is None:
                proc.kill()
