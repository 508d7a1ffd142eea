"""Connecting to Ray: join the cluster a job runs in, or start a local one on a laptop.

What the console shows while connected (the known noise kept in Ray's log files, ``--verbose``) is
``ray_e5.console``'s concern; ``connect`` applies its filters to the driver and passes them on to the workers.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from ray_e5.console import (_filter_worker_logs, _quiet_ray_data, _worker_pythonwarnings, quiet_records,
                            quiet_warnings, verbose)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class ClusterUnreachable(ConnectionError):
    """The Ray address found (and where it was found) answers nothing; says how to clear it."""


def _found_address(address: str | None) -> tuple[str | None, str]:
    """The address ``ray.init`` would join and where it comes from: the argument (``--address`` or the config's
    ``ray_address``), ``RAY_ADDRESS``, or the file a ``ray start --head`` on this machine leaves behind."""
    if address:
        return address, "--address / ray_address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "the RAY_ADDRESS environment variable"
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as fh:
            found = fh.read().strip()
    except OSError:
        return None, ""
    return (found or None), f"{path} (left by `ray start --head` on this machine)"


def _check_reachable(address: str, where: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, naming the address and where it was found, when nothing listens there: ``ray.init`` would
    otherwise retry "Failed to connect to GCS" for minutes."""
    import socket

    if "://" in address or address in ("auto", "local"):
        return  # ray:// clients and Ray's own keywords: ray.init resolves and reports those itself
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                fix = (f"delete that file (or run `ray stop`) to start a fresh local cluster"
                       if where.startswith(os.sep) else "start that cluster, or correct the address")
                raise ClusterUnreachable(
                    f"no Ray cluster answers at {address}, found in {where} ({err.strerror or err}); {fix}, or pass "
                    "--address HOST:PORT of a running cluster") from None
            time.sleep(0.5)


def _loopback_cluster(address: str) -> bool:
    """Whether ``address`` is a cluster on this machine that listens on loopback only (one a ray-e5 driver or test
    started): Ray maps 127.0.0.1 to the machine's network address before it connects, so a driver joining such a
    cluster must take the same single-machine switch the cluster took."""
    import socket

    host, _, port = address.rpartition(":")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
        return False
    from ray._private.services import node_ip_address_from_perspective

    ip = node_ip_address_from_perspective(None)
    if ip in ("127.0.0.1", "::1"):
        return True
    try:
        with socket.create_connection((ip, int(port)), timeout=2):
            return False  # it listens on the machine's address too: an ordinary cluster
    except OSError:
        return True


def _job_env_vars() -> set[str]:
    """The environment variables the Ray job this driver runs in already sets (``ray job submit
    --runtime-env-json``): Ray refuses a ray.init runtime env that names any of them again, even with the same value."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return set()
    return set((runtime_env.get("env_vars") or {}) if isinstance(runtime_env, dict) else ())


def loopback_only() -> None:
    """Make the local cluster ray.init is about to start advertise and bind 127.0.0.1, not the machine's network
    address. Ray's own switch for single-machine clusters (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what it does
    on laptops) is read when Ray is imported, so it is set on the imported module; it is not put in the environment,
    where it would stop a later ``ray start --address`` from adding a node."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None = None, num_cpus: int | None = None):
    """Initialise Ray once: ``address`` (or RAY_ADDRESS, as `ray job submit` sets) joins a cluster; else local.

    Offline switches the driver has (HF_HUB_OFFLINE, ...) are passed on to the workers, and so, unless verbose, are
    the warning filters for known noise; a variable the job's own runtime env sets is left to it (its value wins).
    A local cluster advertises and binds its agents on 127.0.0.1: nothing of it is meant for other machines.
    """
    import ray

    if ray.is_initialized():
        return ray
    quiet = not verbose()
    env = {k: os.environ[k] for k in OFFLINE_ENV if k in os.environ}
    if quiet:
        env["PYTHONWARNINGS"] = _worker_pythonwarnings()
        # the hub's and transformers' own bars and notices ("Loading weights") stay off the user's console on
        # every node, not only on the nodes that inherit the driver's environment
        env.update({"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"})
        # Ray Serve's records (one access line per request) go to its log files under the session's logs/serve,
        # not to the replicas' stderr, which Ray forwards to the driver's console
        env["RAY_SERVE_LOG_TO_STDERR"] = "0"
        quiet_warnings()
        quiet_records()
    for key in _job_env_vars():
        env.pop(key, None)
    found, where = _found_address(address)
    if found:
        _check_reachable(found, where)
        if _loopback_cluster(found):
            loopback_only()  # Ray would otherwise look for it at the machine's address, where it does not listen
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    if quiet:
        kwargs["logging_level"] = logging.WARNING  # "Started a local Ray instance", "Connecting to ..." lines
    if address:
        ray.init(address=address, **kwargs)
    elif found:  # the cluster `ray start --head` runs on this machine
        ray.init(**kwargs)
    else:
        loopback_only()
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    if quiet:
        _filter_worker_logs()
        _quiet_ray_data()
    _sigterm_as_interrupt()
    return ray


def _sigterm_as_interrupt() -> None:
    """SIGTERM (`ray job stop`, a container stop) takes the same way out as Ctrl-C: one line, no stack frames.

    Replaces the handler ray.init installs (a bare sys.exit); only the main thread may set handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def wait_forever(log: Callable[[str], None] = print) -> None:
    """Keep the driver (and so a local cluster and the server on it) alive until Ctrl-C."""
    log("[ray-e5] serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("[ray-e5] stopped")
