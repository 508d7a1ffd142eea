"""The evaluate stage: every configured model on every configured task, fanned out over Ray, cached per task,
then a report.

Entry points:
- :func:`evaluate` (``ray-e5 evaluate``, ``jobs/evaluate.py``, the quickstart): the whole stage from a config.
- :func:`score_local_task`: one model on one local folder, in this process, returning the main score (used by
  training and the quickstart for STS-B test Spearman, SciFact nDCG@10).

Layout under ``<run_dir>/eval/``: ``results/<model>/<task>.json`` (one record per finished task, with mteb's
full TaskResult; a rerun skips those whose model and task fingerprints still match), ``report.json``,
``report.md``, ``scores.png``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray_e5.rundir import RunDir
from ray_e5 import storage
from ray_e5.config import RayE5Config
from ray_e5.evaluate.config import EvaluateSettings
from ray_e5.evaluate.models import ModelSpec, resolve_models, slug
from ray_e5.evaluate.result import EvaluateResult, TaskError
from ray_e5.evaluate.tasks import TaskSpec, largest_first, resolve_tasks

log = logging.getLogger(__name__)


# ---- one model, one local task, this process ---------------------------------------------------------------
def score_local_task(model, folder: str | Path, *, split: str = "test", instructions: bool | None = None,
                     max_samples: int | None = None, max_corpus: int | None = None, batch_size: int = 32,
                     main_score: str | None = None, seed: int = 42, return_record: bool = False):
    """The main score (0-1) of ``model`` on a local task folder, computed by mteb in this process.

    ``model`` is an Embedder (or anything with ``encode(texts, instruction, batch_size)``, ``name`` and
    ``dimension``) or a reference for ``Embedder.load``. ``instructions=None`` applies the paper's instructions
    to last-token (E5-style) models and not to encoders such as MiniLM. Raises on failure.
    """
    from ray_e5.evaluate.encoder import E5Encoder
    from ray_e5.evaluate.local_tasks import load_local_task
    from ray_e5.evaluate.worker import run_task

    if isinstance(model, (str, Path)):
        from ray_e5.model import Embedder

        model = Embedder.load(str(model))
    task = load_local_task(folder, split=split, max_samples=max_samples, max_corpus=max_corpus, seed=seed,
                           main_score=main_score)
    record = run_task(E5Encoder(model, getattr(model, "name", None), instructions), task, batch_size)
    if record["status"] != "ok":
        raise RuntimeError(f"evaluating {record['model']} on {record['task']} failed: {record['error']}")
    return record if return_record else record["score"]


# ---- the cache -----------------------------------------------------------------------------------------------
def record_path(out_dir: str, model: ModelSpec, task: TaskSpec) -> str:
    return storage.join(out_dir, "results", slug(model.label), slug(task.name) + ".json")


def cached_record(out_dir: str, model: ModelSpec, task: TaskSpec, instructions: dict[str, str]) -> dict | None:
    path = record_path(out_dir, model, task)
    if not storage.exists(path):
        return None
    try:
        record = storage.read_json(path)
    except (ValueError, OSError):
        return None
    if (record.get("status") == "ok" and record.get("model_fingerprint") == model.fingerprint
            and record.get("task_fingerprint") == task.fingerprint
            and record.get("instruction_override") == instructions.get(task.name)):
        return record
    return None


# ---- fan-out -------------------------------------------------------------------------------------------------
def _worker_resources(settings: EvaluateSettings, ray) -> tuple[float, int]:
    cpus = settings.cpus_per_worker
    if cpus is None:  # what is free now (a server left up may hold some): the total would never be scheduled
        free = min(ray.available_resources().get("CPU", 1.0), ray.cluster_resources().get("CPU", 1.0))
        cpus = max(1.0, float(int(free // settings.num_workers)))
    threads = settings.torch_threads or max(1, int(cpus))
    return cpus, threads


def _run_all(ray, work: list[tuple[ModelSpec, TaskSpec]], settings: EvaluateSettings,
             instructions: dict[str, str], on_record) -> None:
    """Run (model, task) pairs on up to ``num_workers`` actors, in the given order (model-major, so a worker keeps
    its model between tasks; largest task first within a model); ``on_record`` gets each record as it lands. A
    dominant retrieval corpus is first embedded in shards by every worker (:mod:`ray_e5.evaluate.sharding`), its
    task waiting for them while other tasks run. A worker that dies loses only the job it was running; a failed
    shard makes its task embed the corpus itself."""
    from ray.exceptions import RayActorError, RayTaskError

    from ray_e5.evaluate.sharding import corpus_texts, shards, worth_sharding
    from ray_e5.evaluate.worker import EvalWorker

    cpus, threads = _worker_resources(settings, ray)
    use_gpu = settings.gpus_per_worker > 0
    worker_cls = ray.remote(EvalWorker).options(num_cpus=cpus, num_gpus=settings.gpus_per_worker,
                                                max_restarts=settings.max_restarts, max_task_retries=1)

    def start():
        return worker_cls.remote(instructions, threads, use_gpu)

    def chars(task) -> int:
        return task.text_chars() if hasattr(task, "text_chars") else 0

    totals: dict[str, int] = {}
    for model, task in work:
        totals[model.label] = totals.get(model.label, 0) + chars(task)
    queue: list[tuple] = []  # ("shard", model, task, index, texts ref) or ("task", model, task)
    sharded: dict[tuple[str, str], list | str] = {}  # (model, task) -> shard vector refs, or "failed"
    for model, task in work:
        if settings.shard_min_chars and worth_sharding(chars(task), totals[model.label], settings.num_workers,
                                                       settings.shard_min_chars):
            parts = shards(corpus_texts(getattr(task, "task", None)), settings.num_workers)
            if len(parts) > 1 and all(parts):
                sharded[(model.label, task.name)] = [None] * len(parts)
                queue += [("shard", model, task, i, ray.put(part)) for i, part in enumerate(parts)]
                log.info("%s / %s: corpus embedded in %d shards", model.label, task.name, len(parts))
        queue.append(("task", model, task))

    def ready(item) -> bool:
        state = sharded.get((item[1].label, item[2].name))
        return item[0] == "shard" or state is None or state == "failed" or all(r is not None for r in state)

    def submit(worker, item):
        if item[0] == "shard":
            return worker.encode_documents.remote(item[1], item[4], settings.batch_size)
        state = sharded.get((item[1].label, item[2].name))
        vectors = state if isinstance(state, list) else []
        if id(item[2]) not in refs:
            refs[id(item[2])] = ray.put(item[2])
        return worker.run.remote(item[1], refs[id(item[2])], settings.batch_size, *vectors)

    idle = [start() for _ in range(min(settings.num_workers, len(queue)))]
    running: dict[Any, tuple[Any, tuple]] = {}
    refs: dict[int, Any] = {}  # one object-store copy of each task, shared by every model and worker
    try:
        while queue or running:
            while idle and (item := next((q for q in queue if ready(q)), None)) is not None:
                queue.remove(item)
                worker = idle.pop()
                running[submit(worker, item)] = (worker, item)
            done, _ = ray.wait(list(running), num_returns=1)
            worker, item = running.pop(done[0])
            kind, model, task = item[0], item[1], item[2]
            try:
                result = ray.get(done[0])  # a shard's vectors are read in place, and stay in the object store
                idle.append(worker)
            except (RayActorError, RayTaskError) as err:
                ray.kill(worker)
                idle.append(start())
                if kind == "shard":
                    log.warning("%s / %s: a corpus shard failed (%s); the task embeds its corpus itself",
                                model.label, task.name, _cause(err))
                    sharded[(model.label, task.name)] = "failed"
                    continue
                result = {"task": task.name, "type": task.type, "status": "error",
                          "error": f"task {task.name!r}: the worker died: {_cause(err)}"}
            if kind == "shard":
                state = sharded[(model.label, task.name)]
                if isinstance(state, list):
                    state[item[3]] = done[0]
                continue
            on_record(model, task, result)
    finally:
        for w in idle + [w for w, _ in running.values()]:
            ray.kill(w)


def _cause(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), type(err).__name__)[:500]


# ---- the stage -----------------------------------------------------------------------------------------------
def evaluate(config: RayE5Config) -> EvaluateResult:
    """Evaluate the configured models on the configured tasks; write results and the report under
    ``<run_dir>/eval`` (or ``evaluate.output``); return the scores, the failed pairs, where the report went and the
    report itself (with ``paths`` and ``ran``/``cached``)."""
    settings = config.section("evaluate", EvaluateSettings)
    out_dir = settings.output or RunDir.of(config.run_dir).eval
    storage.check_access(out_dir, "evaluate.output" if settings.output else "run_dir", must_exist=False)
    tasks = resolve_tasks(settings.task_entries(config.data_dir), settings.seed, settings.benchmark, config.data_dir)
    models = resolve_models(config, settings)
    overrides = dict(settings.instructions)
    overrides.update({t.name: t.entry.instruction for t in tasks if t.entry.instruction})

    records: dict[str, dict[str, dict]] = {m.label: {} for m in models}
    ran, cached = [], []
    pending: dict[str, list[TaskSpec]] = {}
    for model in models:
        for task in tasks:
            hit = None if settings.overwrite else cached_record(out_dir, model, task, overrides)
            if hit is not None:
                records[model.label][task.name] = hit
                cached.append(f"{model.label}/{task.name}")
            else:
                pending.setdefault(model.label, []).append(task)

    started = time.perf_counter()
    if pending:
        from ray_e5.capacity import Demand, check_fits
        from ray_e5.cluster import connect

        ray = connect(config.ray_address)
        check_fits([Demand("evaluate.cpus_per_worker / evaluate.gpus_per_worker", "evaluation worker",
                           {"CPU": settings.cpus_per_worker or 0, "GPU": settings.gpus_per_worker}, 1)])

        def on_record(model: ModelSpec, task: TaskSpec, record: dict) -> None:
            record.update(model_label=model.label, model_ref=model.ref, model_fingerprint=model.fingerprint,
                          task_fingerprint=task.fingerprint, instruction_override=overrides.get(task.name))
            records[model.label][task.name] = record
            ran.append(f"{model.label}/{task.name}")
            if record.get("status") == "ok":
                storage.write_json(record_path(out_dir, model, task), record)
                log.info("%s / %s: %s = %.4f (%.1fs)", model.label, task.name, task.type,
                         record["score"], record.get("seconds", 0))
            else:
                log.warning("%s / %s failed: %s", model.label, task.name, record.get("error"))

        work = [(m, t) for m in models for t in largest_first(pending.get(m.label, []))]
        _run_all(ray, work, settings, overrides, on_record)

    from ray_e5.evaluate.report import build_report, write_report

    report = build_report(
        [{"label": m.label, "ref": m.ref, "endpoint": m.endpoint, "dimension": m.dimension, "parent": m.parent,
          "full_dimension": _full_dimension(records.get(m.label, {}))} for m in models],
        [{"name": t.name, "type": t.type, "main_score": _main_score(t, records), "local": t.local,
          "path": t.entry.path, "english": _english_only(t)} for t in tasks],
        records)
    report.update(ran=ran, cached=cached, wall_seconds=round(time.perf_counter() - started, 3), output=out_dir)
    if settings.report:
        report["paths"] = write_report(out_dir, report)
    return EvaluateResult(report_paths=dict(report.get("paths") or {}), scores=report["scores"],
                          errors=[TaskError(e["model"], e["task"], str(e["error"] or "")) for e in report["errors"]],
                          output=out_dir, report=report)


def _english_only(task: TaskSpec) -> bool | None:
    """Whether every language the task evaluates is English (its mteb metadata's ``eval_langs``); None when
    unknown (a hub task is loaded only by its worker)."""
    langs = getattr(getattr(task.task, "metadata", None), "eval_langs", None)
    if not langs:
        return None
    flat = [lang for group in (langs.values() if isinstance(langs, dict) else [langs]) for lang in group]
    return bool(flat) and all(str(lang).startswith("eng") for lang in flat)


def _full_dimension(by_task: dict[str, dict]) -> int | None:
    return next((r["dimension"] for r in by_task.values() if r.get("dimension")), None)


def _main_score(task: TaskSpec, records: dict[str, dict[str, dict]]) -> str:
    if task.task is not None:
        return task.task.metadata.main_score
    for by_task in records.values():
        if by_task.get(task.name, {}).get("main_score"):
            return by_task[task.name]["main_score"]
    return "main_score"
