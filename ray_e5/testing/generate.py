"""Test helpers for generation: a generation driver in its own process, for tests that kill it mid-run."""

from __future__ import annotations

import json
import subprocess
import sys

_DRIVER = ("import json, sys; from ray_e5.config import RayE5Config; from ray_e5.generate.run import generate; "
           "generate(RayE5Config.model_validate(json.loads(sys.argv[1])))")


def generation_driver(config, ray_address: str) -> subprocess.Popen:
    """``generate(config)`` in a new process (its own session, so ``os.killpg`` kills it whole), joined to the
    cluster at ``ray_address``; its output is discarded."""
    payload = json.dumps({**config.model_dump(), "ray_address": ray_address})
    return subprocess.Popen([sys.executable, "-c", _DRIVER, payload], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
