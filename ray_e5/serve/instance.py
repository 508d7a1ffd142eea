"""The running Ray Serve instance's HTTP options, read before assuming them.

Serve's HTTP options (host, port) are cluster-wide and fixed when Serve first starts: a later ``serve.start`` with
other options only logs a warning, and its apps are served at the first caller's address. Whoever starts Serve (the
serve stage, the vLLM writer of the generate stage) reads what is running first and stops with a clear message when it
differs from what its config asks for, instead of serving silently somewhere else.
"""

from __future__ import annotations

from ray_e5.serve.config import is_loopback


class ServeConflict(RuntimeError):
    """Ray Serve already runs on this cluster with HTTP options other than the config's."""


def running_http_options() -> tuple[str, int] | None:
    """(host, port) of the Serve instance running on the connected cluster, or None when Serve is not running."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # no controller: Serve is not running
        return None
    options = ray.get(controller.get_http_config.remote())
    return str(options.host), int(options.port)


def same_address(running: tuple[str, int], host: str, port: int) -> bool:
    """Hosts agree when equal or both loopback (127.0.0.1 and localhost bind the same interface for this check)."""
    run_host, run_port = running
    return run_port == port and (run_host == host or (is_loopback(run_host) and is_loopback(host)))


def check_http_options(host: str, port: int, keys: str, remedy: str) -> tuple[str, int] | None:
    """Raise ServeConflict when Serve runs at another host:port than ``host:port`` (``keys``: the config keys that
    set them); return what runs (None when Serve is not running)."""
    running = running_http_options()
    if running is not None and not same_address(running, host, port):
        raise ServeConflict(
            f"Ray Serve already runs on this cluster with HTTP on {running[0]}:{running[1]}, but {keys} ask for "
            f"{host}:{port}; Serve's HTTP options are cluster-wide and fixed when it starts, so the app would be "
            f"served at {running[0]}:{running[1]} instead. {remedy}")
    return running
