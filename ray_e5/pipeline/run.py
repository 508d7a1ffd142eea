"""Run the registered stages in order on one run directory; each stage resumes from what a killed run left behind.

The stages, their order and their results come from the stage registry (:mod:`ray_e5.stages`); the config is
validated whole (every section), and every dataset it names is found (:func:`ray_e5.datasets.check_datasets`),
before Ray starts. Every stage is run the same way: its entry point's typed result is kept under its name.
"""

from __future__ import annotations

import time
from typing import Any

from ray_e5.config import RayE5Config, check_sections
from ray_e5.outcome import EmptyOutputError
from ray_e5.stages import STAGES, select


def run_pipeline(config: RayE5Config, stages: tuple[str, ...] | list[str] = tuple(STAGES), log=print,
                 allow_empty_synthetic: bool = False) -> dict[str, Any]:
    """Run ``stages`` (a subset of the registered stages, run in registry order); return each stage's typed
    result by stage name.

    A stage that ends with nothing the next stages can use (:class:`~ray_e5.outcome.EmptyOutputError`; today
    generation that wrote no valid row) stops the pipeline there, its message naming the way on, unless
    ``allow_empty_synthetic``: then one warning line is logged and the next stages go on without its output
    (training on the labeled sources alone).
    """
    chosen = select(tuple(stages))  # unknown names fail here, all of them named
    check_sections(config)  # a typo in the last section fails before the first stage starts
    from ray_e5.datasets import check_datasets

    # every dataset train and evaluate name, on the mirror under data_dir or the Hub, before Ray starts or
    # generation pays for anything: one error naming each missing one
    check_datasets(config, tuple(s.name for s in chosen))
    from ray_e5.cluster import connect

    connect(config.ray_address)
    results: dict[str, Any] = {}
    for stage in chosen:
        start = time.perf_counter()
        log(f"[ray-e5] {stage.name}: starting")
        try:
            results[stage.name] = stage.run_function()(config)
        except EmptyOutputError as err:
            if not allow_empty_synthetic:
                raise err.with_remedy() from None
            log(f"[ray-e5] warning: {err} -- {err.going_on}")
            results[stage.name] = err.result
        log(f"[ray-e5] {stage.name}: done in {time.perf_counter() - start:.0f} s")
    return results
