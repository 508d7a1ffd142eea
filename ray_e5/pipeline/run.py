"""Run the stages in order on one run directory; each stage resumes from what a killed run left behind."""

from __future__ import annotations

import time
from typing import Callable

from ray_e5.config import RayE5Config

STAGES = ("generate", "train", "evaluate", "serve")


def _generate(config: RayE5Config):
    from ray_e5.synth.run import generate

    return generate(config)


def _train(config: RayE5Config):
    from ray_e5.train.run import train

    return train(config)


def _evaluate(config: RayE5Config):
    from ray_e5.eval.run import evaluate

    return evaluate(config)


def _serve(config: RayE5Config):
    from ray_e5.serve.run import serve

    return serve(config, blocking=False)


RUNNERS: dict[str, Callable[[RayE5Config], object]] = {
    "generate": _generate, "train": _train, "evaluate": _evaluate, "serve": _serve,
}


def run_pipeline(config: RayE5Config, stages: tuple[str, ...] = STAGES, log=print) -> dict[str, object]:
    """Run ``stages`` (a subset of generate, train, evaluate, serve, in that order); return each stage's result."""
    unknown = [s for s in stages if s not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; accepted: {', '.join(STAGES)}")
    from ray_e5.cluster import connect

    connect(config.ray_address)
    results: dict[str, object] = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        start = time.perf_counter()
        log(f"[ray-e5] {stage}: starting")
        results[stage] = RUNNERS[stage](config)
        log(f"[ray-e5] {stage}: done in {time.perf_counter() - start:.0f} s")
    return results


def wait_forever() -> None:
    """Keep the driver (and so the local cluster and its server) alive until Ctrl-C."""
    print("[ray-e5] serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
