"""Joining Ray: a local cluster that stays on loopback, a job's runtime env merged rather than refused, and a
stale cluster address that fails in seconds, naming where it was found."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import shutil
import tempfile
import textwrap

import pytest

from ray_e5.cluster import ClusterUnreachable, _check_reachable, _found_address


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def _stale_address_file(tmp_path, monkeypatch) -> tuple[str, str]:
    """The file a `ray start --head` that has since died leaves behind, in a Ray temp dir of this test's own."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{_unused_port()}"
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(address)
    return address, str(tmp_path / "ray" / "ray_current_cluster")


def test_a_stale_cluster_address_fails_fast_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    address, path = _stale_address_file(tmp_path, monkeypatch)
    found, where = _found_address(None)
    assert found == address and where.startswith(path)
    with pytest.raises(ClusterUnreachable) as err:
        _check_reachable(found, where, timeout_s=1.0)
    message = str(err.value)
    print(message)
    assert address in message and path in message and "--address" in message and "delete that file" in message
    # an address the user passed is named as theirs
    with pytest.raises(ClusterUnreachable, match="--address / ray_address"):
        _check_reachable(*_found_address(address), timeout_s=0.5)
    # a live listener passes
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        _check_reachable(f"127.0.0.1:{server.getsockname()[1]}", "test")


def test_every_command_stops_on_a_stale_address_instead_of_hanging(tmp_path, monkeypatch):
    """What every ray-e5 command does first (connect), in a fresh process, with a stale address file."""
    address, path = _stale_address_file(tmp_path, monkeypatch)
    done = subprocess.run([sys.executable, "-c", "from ray_e5.cluster import connect; connect()"],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode != 0
    assert "ClusterUnreachable" in done.stderr and address in done.stderr and path in done.stderr, done.stderr[-2000:]
    assert "Failed to connect to GCS" not in done.stderr


PROBE = textwrap.dedent("""
    import json, psutil, ray
    from ray_e5.cluster import connect
    connect(num_cpus=1)
    me = psutil.Process()
    pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
    listening = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN and c.pid in pids})
    env = ray.get(ray.remote(lambda: __import__("os").environ.get("HF_HUB_OFFLINE")).remote())
    print(json.dumps({"node": ray.nodes()[0]["NodeManagerAddress"], "listening": listening, "worker_env": env}))
""")


@pytest.mark.cluster  # its driver starts a local Ray of its own
def test_a_local_cluster_listens_on_loopback_and_joins_a_jobs_runtime_env(tmp_path):
    """A driver inside a job whose --runtime-env-json sets HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM (Ray puts the
    job's config in RAY_JOB_CONFIG_JSON_ENV_VAR): connect() must not name them again (Ray refuses the merge); and
    the local cluster it starts listens on loopback only."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    short = tempfile.mkdtemp(prefix="re5c_", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env.update({"RAY_TMPDIR": short, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(
                    {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}})})
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    print(seen)
    assert seen["worker_env"] == "1"  # the job's value reached the workers
    assert seen["node"] == "127.0.0.1"
    assert seen["listening"], "no listening socket found for the cluster's processes"
    assert all(ip.removeprefix("::ffff:") in ("127.0.0.1", "::1") for ip in seen["listening"]), seen["listening"]
