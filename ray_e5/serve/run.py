"""Start and stop the embeddings application on the connected Ray cluster."""

from __future__ import annotations

from ray_e5.config import ConfigError, RayE5Config
from ray_e5.rundir import RunDir
from ray_e5.serve.config import ServeSettings
from ray_e5.serve.result import ServeResult

APP_NAME = "ray-e5"


def model_reference(config: RayE5Config, settings: ServeSettings) -> str:
    """serve.model, else the run's trained embedder when it exists, else model.name."""
    if settings.model:
        return settings.model
    trained = RunDir.of(config.run_dir).trained_embedder()  # replicas copy a remote one to their node
    return trained or config.model.name


def serve(config: RayE5Config, blocking: bool = False) -> ServeResult:
    """Deploy the application; return the base URL for the openai client (``http://host:port/v1``) and the model
    name clients send. The pipeline goes on once it is up; ``blocking`` (``ray-e5 serve``) keeps serving until
    Ctrl-C instead."""
    from ray import serve as ray_serve

    from ray_e5.cluster import connect
    from ray_e5.serve.app import build_app, start_serve

    settings = config.section("serve", ServeSettings)
    key = settings.resolve_api_key()  # here, on the driver: where the user set it
    try:
        settings.check_exposure(key)
    except ValueError as err:
        raise ConfigError([str(err)]) from None
    connect(config.ray_address)
    from ray_e5.capacity import Demand, check_fits

    check_fits([Demand("serve.num_cpus / serve.num_gpus / serve.autoscaling.min_replicas", "Serve replica",
                       {"CPU": settings.num_cpus, "GPU": settings.num_gpus}, settings.autoscaling.min_replicas)])
    start_serve(settings)
    ray_serve.run(build_app(settings, model_reference(config, settings), key), name=APP_NAME, route_prefix="/")
    wait_for_old_replicas(APP_NAME)
    url = f"http://{settings.host}:{settings.port}/v1"
    source = ("serve.api_key" if settings.api_key is not None and settings.api_key.get_secret_value()
              else f"${settings.api_key_env}")
    print(f"[ray-e5] API key auth is {f'ON (key from {source})' if key else 'OFF (no key set)'}", flush=True)
    if blocking:
        from ray_e5.cluster import wait_forever

        print(f"[ray-e5] serving {settings.model_name} at {url}")
        wait_forever()
    return ServeResult(url=url, model_name=settings.model_name)


def wait_for_old_replicas(app: str, timeout_s: float = 120.0) -> None:
    """Return once every replica of ``app`` runs the version just deployed.

    ``serve.run`` returns when the new replicas are up, while the old ones still drain and answer: after a key
    rotation they would still let the old key in. Waiting here makes "serving" mean the new settings are enforced.
    """
    import time

    from ray import serve as ray_serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = ray_serve.status().applications.get(app)
        states = {str(state).rsplit(".", 1)[-1] for d in (status.deployments.values() if status else ())
                  for state, count in d.replica_states.items() if count}
        if states <= {"RUNNING"}:
            return
        time.sleep(0.5)
    raise TimeoutError(f"replicas of the previous version of {app!r} were still running {timeout_s:.0f} s after "
                       "the new one started; see `serve status`")


def shutdown() -> None:
    from ray import serve as ray_serve

    ray_serve.shutdown()
