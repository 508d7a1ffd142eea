"""Evaluation during training (``train.eval_every``): a small dev suite scored with the embedder being trained.

The dev sets (``train.eval_tasks``, entries shaped as ``evaluate.tasks``' ones) are resolved and loaded on the
DRIVER by the evaluate stage's own resolver (:func:`ray_e5.evaluate.tasks.resolve_task`: folders under
``data_dir``, or Hugging Face datasets with a ``type``), and travel to the workers inside the train loop's config
as loaded mteb task objects (a few hundred texts): a worker never reads the driver's disk. A dev entry that would
be an MTEB Hub task (loaded by the process that runs it, and whole: ``max_samples`` does not apply) is refused.

Scores come from the evaluate stage's path, unchanged: :func:`ray_e5.evaluate.worker.run_task` (mteb's evaluators:
Spearman for STS, nDCG@10 for retrieval, ...) on an :class:`~ray_e5.evaluate.encoder.E5Encoder` around the
in-training embedder, whose ``encode`` runs in eval mode under ``torch.inference_mode`` and restores train mode.
Metrics are named ``dev/<task>_<metric>`` (``spearman`` for STS's cosine Spearman, else mteb's main score name) and
``dev/mean`` (their mean).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ray_e5.settings import ConfigError

PREFIX = "dev/"
MEAN = "dev/mean"
_SHORT = {"cosine_spearman": "spearman"}  # the metric names the issue and the docs use


@dataclass
class DevTask:
    """One loaded dev task, ready to ship to a worker: its reported name, metric and the mteb task object."""

    name: str
    metric: str  # dev/<name>_<metric>
    task: Any


def metric_name(task_name: str, main_score: str) -> str:
    return f"{PREFIX}{task_name}_{_SHORT.get(main_score, main_score)}"


def load_dev_tasks(entries: list, data_dir: str | None, seed: int = 42) -> list[DevTask]:
    """Resolve and load ``train.eval_tasks`` here, on the driver; a bad entry is a ConfigError naming its key."""
    from ray_e5.evaluate.tasks import resolve_task

    tasks, seen = [], set()
    for i, entry in enumerate(entries):
        key = f"train.eval_tasks.{i}"
        try:
            spec = resolve_task(entry, seed, data_dir)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
        if not spec.local or spec.task is None:
            raise ConfigError(f"{key}: {spec.name!r} resolves to an MTEB Hub task, which a training worker would "
                              "download and score whole; accepted: a task folder (path, under data_dir) or a Hugging "
                              "Face dataset with a type (hf + type), subsampled with max_samples / max_corpus")
        if spec.name in seen:
            raise ConfigError(f"{key}: two dev tasks are named {spec.name!r}; give one of them a distinct `name`")
        seen.add(spec.name)
        tasks.append(DevTask(spec.name, metric_name(spec.name, spec.task.metadata.main_score), spec.task))
    if not tasks:
        raise ConfigError("train.eval_tasks: empty; list dev sets (e.g. {path: stsbenchmark, split: dev, "
                          "max_samples: 200}) or set train.eval_every to 0")
    return tasks


def metric_names(tasks: list[DevTask]) -> list[str]:
    """Every metric an evaluation reports: each task's, then ``dev/mean``."""
    return [t.metric for t in tasks] + [MEAN]


def evaluate(embedder, tasks: list[DevTask], batch_size: int = 32) -> dict[str, float]:
    """Score ``embedder`` (the in-training Embedder) on the dev tasks: ``{dev/<task>_<metric>: score, ...,
    dev/mean: ...}``. A task that fails raises (a dev set that scores nothing would silently pick checkpoints)."""
    from ray_e5.evaluate.encoder import E5Encoder
    from ray_e5.evaluate.worker import run_task

    from ray_e5.console import quiet_loggers

    encoder = E5Encoder(embedder, "in-training")
    scores: dict[str, float] = {}
    for dev in tasks:
        with quiet_loggers("mteb", "ray_e5.evaluate"):
            record = run_task(encoder, copy.deepcopy(dev.task), batch_size)  # a copy: mteb may reshape its data
        if record.get("status") != "ok":
            raise RuntimeError(f"train.eval_tasks: {dev.name}: {record.get('error')}")
        scores[dev.metric] = float(record["score"])
    scores[MEAN] = sum(scores.values()) / len(scores)
    return scores
