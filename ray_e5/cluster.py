"""Connecting to Ray: join the cluster a job runs in, or start a local one on a laptop."""

from __future__ import annotations

import os

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def connect(address: str | None = None, num_cpus: int | None = None):
    """Initialise Ray once: ``address`` (or RAY_ADDRESS, as `ray job submit` sets) joins a cluster; else local.

    Offline switches the driver has (HF_HUB_OFFLINE, ...) are passed on to the workers.
    """
    import ray

    if ray.is_initialized():
        return ray
    env = {k: os.environ[k] for k in OFFLINE_ENV if k in os.environ}
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return ray
