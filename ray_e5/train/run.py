"""`train(config)`: plan the data, run the Ray Train job, write the embedder and the loss curve.

Outputs under the run directory:
    train/data.json       the batch plan: steps, and per source rows read, used, filtered, skipped (with reasons)
    train/run.json        this run's Ray Train name and fingerprint (what a later call resumes, or refuses to)
    train/metrics.jsonl   per-step loss, lr, examples/s, tokens/s; an `eval` line per dev evaluation (eval_every)
    train/mlruns/, train/tensorboard/   the trackers' logs (train.report_to: mlflow, tensorboard)
    train/loss.png        the loss curve
    train/<name>/         Ray Train's checkpoints (adapter + optimizer state)
    embedder/             the trained embedder (ray_e5.json + adapter/ + README.md, its model card), what
                          ``Embedder.load`` reads; ray_e5.json's ``inference`` block holds the settings the recipe
                          scores it with (evaluate.models' entry for {run_dir}/embedder), which serve and export use
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ray_e5.digest import digest as _digest
from ray_e5 import storage
from ray_e5.config import ConfigError, LoraSettings, RayE5Config
from ray_e5.rundir import EMBEDDER_FILE, RUN_FILE, RunDir
from ray_e5.train.config import TrainSettings
from ray_e5.train.result import TrainResult

log = logging.getLogger("ray_e5.train")


def model_settings(config: RayE5Config):
    """The model section with LoRA on (the paper's r=16 defaults when the config names none)."""
    model = config.model
    return model if model.lora is not None else model.model_copy(update={"lora": LoraSettings()})


def scored_inference(config: RayE5Config) -> dict | None:
    """The inference settings the config scores this run's embedder with: its ``evaluate.models`` entry for
    ``{run_dir}/embedder`` (max length, dtype, pooling, normalisation, instructions), so that serving and exporting
    the embedder use what was scored, not the training length. None when no entry names it (evaluate then scores
    it at its training settings, which a plain load uses anyway)."""
    run = RunDir.of(config.run_dir)
    for i, entry in enumerate(getattr(config.evaluate, "models", None) or []):
        ref = getattr(entry, "model", None) or getattr(entry, "ref", None) or ""
        if getattr(entry, "endpoint", None):
            continue
        ref = ref.replace("{run_dir}", config.run_dir.rstrip("/")).rstrip("/")
        if ref != run.embedder and RunDir.of(ref).uri != run.embedder:
            continue
        block = {k: getattr(entry, k) for k in ("max_length", "dtype", "pooling", "normalize")
                 if getattr(entry, k, None) is not None}
        if isinstance(getattr(entry, "instructions", None), bool):
            block["instructions"] = entry.instructions
        block["trained_max_length"] = config.model.max_length
        block["source"] = f"evaluate.models[{i}]" + (f" ({entry.label})" if getattr(entry, "label", None) else "")
        return block
    return None


def _stage_embedder(config: RayE5Config, settings: TrainSettings, checkpoint, data: dict, steps: dict) -> str:
    """A local copy of the checkpoint's embedder with what the run adds before it is published: the inference block
    (:func:`scored_inference`) and the model card, both listed in its manifest (rewritten last)."""
    import tempfile

    import pyarrow.fs as pafs

    from ray_e5.model import Embedder
    from ray_e5.model.card import build_model_card, run_records
    from ray_e5.model.embedder import INFERENCE_KEY, rewrite_manifest
    from ray_e5.train.loop import EMBEDDER_DIR

    staging = tempfile.mkdtemp(prefix="ray-e5-publish-")
    pafs.copy_files(f"{checkpoint.path}/{EMBEDDER_DIR}", staging, source_filesystem=checkpoint.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    inference = scored_inference(config)
    if inference:
        rewrite_manifest(staging, **{INFERENCE_KEY: inference})
    try:
        run = RunDir.of(config.run_dir)
        records = {**run_records(run.uri), "data": data, "summary": steps}
        embedder = Embedder.load(staging)  # the card describes what a user loads: the scored settings
        card = build_model_card(embedder, run.embedder, records,
                                training=settings.model_dump(mode="json", exclude={"sources"}))
        card.save(Path(staging) / "README.md")
    except Exception as err:  # noqa: BLE001 - a card is documentation: the trained embedder is published anyway
        log.warning("train: the model card could not be written (%s); publishing the embedder without it", err)
    rewrite_manifest(staging)  # lists README.md: a publish cut off before it is not a whole embedder
    return staging


def _sources(config: RayE5Config, settings: TrainSettings) -> list:
    from ray_e5.data.sources import SourceError, source_from_settings, synthetic_source

    # Preflight: the run directory's store answers and its bucket exists, before any source is read.
    storage.check_access(config.run_dir, "run_dir", must_exist=False)
    sources = []
    if settings.synthetic:
        synthetic = synthetic_source(config.run_dir, settings.synthetic_weight)
        if synthetic is not None:
            sources.append(synthetic)
    for i, source in enumerate(settings.sources):
        try:
            sources.append(source_from_settings(source, config.data_dir))
        except SourceError as err:
            raise ConfigError(f"train.sources.{i}.path: {err}") from None
    if not sources:
        raise ConfigError(f"train.sources: no training data; list labeled sources (JSONL files or folders), or run "
                          f"`ray-e5 generate` first so that {RunDir.of(config.run_dir).synthetic} holds Parquet "
                          f"shards")
    return sources


def _mined_names(settings: TrainSettings, sources: list) -> list[str]:
    """The sources ``train.mine`` mines; an unknown name is a ConfigError naming the accepted ones."""
    names = [s.name for s in sources]
    if settings.mine.sources is None:
        return names
    unknown = sorted(set(settings.mine.sources) - set(names))
    if unknown:
        raise ConfigError(f"train.mine.sources: {unknown} name no training source; accepted: {', '.join(names)}")
    return list(settings.mine.sources)


def mining_model(config: RayE5Config, reference: str | None) -> dict:
    """What the mining encoders load: ``reference`` (an embedder directory or URI) as saved, or the run's base model
    with the config's pooling, length, template and dtype (no LoRA: the model before training)."""
    if reference is not None:
        return {"reference": reference, "overrides": {}}
    fields = config.model.model_dump(exclude={"name", "lora", "gradient_checkpointing"})
    return {"reference": config.model.name, "overrides": fields}


def _mine(config: RayE5Config, settings: TrainSettings, sources: list, names: list[str], train_dir: str) -> dict:
    """The mined rows of the sources ``names`` (checked by :func:`_mined_names`), by name (ray_e5.data.mining)."""
    from ray_e5.data.mining import mine_sources
    from ray_e5.data.sources import read_rows

    tables = {s.name: read_rows(s) for s in sources if s.name in names}
    mine = settings.mine.model_copy(update={"num_workers": settings.mine.num_workers or settings.num_workers,
                                            "cpus_per_worker": settings.mine.cpus_per_worker or settings.cpus_per_worker})
    try:
        return mine_sources(tables, mining_model(config, mine.model), mine,
                            storage.join(train_dir, "mined"), seed=settings.seed)
    except RuntimeError as err:
        raise ConfigError(str(err)) from None


def _fingerprint(config: RayE5Config, settings: TrainSettings, sources: list, total_steps: int) -> dict:
    """What must not change for a checkpoint to be resumed: the data plan, the model, the workers' layout."""
    fingerprint = {
        "sources": [{"name": s.name, "files": list(s.files), "weight": s.weight, "task": s.defaults.task,
                     "min_score": s.defaults.min_score, "graded": s.defaults.graded} for s in sources],
        "batch_size": settings.batch_size, "epochs": settings.epochs, "seed": settings.seed,
        "total_steps": total_steps, "model": model_settings(config).model_dump(),
        "num_workers": settings.num_workers, "engine": settings.engine,
        "zero_stage": settings.zero_stage if settings.engine == "deepspeed" else None,
    }
    # settings added later enter only when set, so the checkpoints of runs without them still resume
    if settings.mine is not None:
        fingerprint["mine"] = settings.mine.model_dump(exclude={"num_workers", "cpus_per_worker", "batch_size"})
    if settings.synthetic_share is not None:
        fingerprint["synthetic_share"] = settings.synthetic_share
    if settings.distill is not None:
        fingerprint["distill"] = settings.distill.model_dump()
    return fingerprint


def _run_name(train_dir: str, settings: TrainSettings, fingerprint: dict) -> str:
    """The Ray Train run name: the previous one to resume it, or a fresh one."""
    uri = storage.join(train_dir, RUN_FILE)
    previous = storage.read_json(uri) if storage.exists(uri) else None
    if settings.resume and previous:
        if previous["fingerprint"] == _digest(fingerprint):
            return previous["name"]
        # New synthetic shards, another source or batch size: the old checkpoints train a different plan, so they
        # are kept where they are and a fresh run starts beside them.
        changed = sorted(k for k in fingerprint if previous.get("settings", {}).get(k) != fingerprint[k])
        print(f"[ray-e5 train] starting a fresh run: {train_dir} holds run {previous['name']} with other settings "
              f"(changed: {', '.join(changed) or 'unknown'}); its checkpoints are kept", flush=True)
    name = "ray_train-" + time.strftime("%Y%m%d-%H%M%S")
    storage.write_json(uri, {"name": name, "fingerprint": _digest(fingerprint), "settings": fingerprint})
    return name


def _state(checkpoint) -> dict:
    """A checkpoint's train_state.json (its step, whether training stopped early, the trackers' run ids)."""
    from ray_e5.train.loop import STATE_FILE

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as src:
        return json.loads(src.read().decode())


def _dev_tasks(config: RayE5Config, settings: TrainSettings) -> list:
    """The dev sets of ``train.eval_every``, loaded here on the driver (None when off); ``train.keep_best`` checked
    against the metrics they produce; the trackers' packages checked."""
    if settings.report_to:
        from ray_e5.train.tracking import check_installed

        check_installed(settings.report_to)
    if settings.eval_every is None:
        return []
    from ray_e5.train.deveval import load_dev_tasks, metric_names

    tasks = load_dev_tasks(settings.eval_tasks, config.data_dir, settings.seed)
    if settings.keep_best is not None and settings.keep_best not in metric_names(tasks):
        raise ConfigError(f"train.keep_best: {settings.keep_best!r} is not a metric of the dev evaluation; "
                          f"accepted: {', '.join(metric_names(tasks))}")
    return tasks


def _tracking(config: RayE5Config, settings: TrainSettings, name: str, total_steps: int) -> dict:
    """What the rank-0 tracker needs: the run's name, the params it logs (the train and model sections, never a
    secret), and the W&B key read here on the driver (workers on other nodes lack its environment), as a secret."""
    if not settings.report_to:
        return {}
    import os

    from pydantic import SecretStr

    params = {"train": settings.model_dump(mode="json", exclude={"eval_tasks", "report_to"}),
              "model": model_settings(config).model_dump(mode="json"), "planned_steps": total_steps}
    key = os.environ.get("WANDB_API_KEY") if "wandb" in settings.report_to else None
    return {"run_name": name, "params": params, "wandb_api_key": SecretStr(key) if key else None}


def _storage_path(uri: str) -> str:
    return storage.resolve(uri)[1] if storage.is_local(uri) else uri


def train(config: RayE5Config) -> TrainResult:
    """Train a LoRA embedder as ``config`` says; returns where the embedder is (``<run_dir>/embedder`` and a local
    copy), the steps trained, and the summary and batch plan written under ``train/``.

    One driver at a time per run directory (:mod:`ray_e5.lease`): two would resume one checkpoint path."""
    from ray_e5.lease import hold_lease

    with hold_lease(config.run_dir, "train"):
        return _train(config)


def _train(config: RayE5Config) -> TrainResult:
    settings = config.section("train", TrainSettings)
    started = time.time()
    deadline = started + settings.max_time_s if settings.max_time_s else None

    sources = _sources(config, settings)  # bad paths fail here, before a cluster starts
    mined_names = _mined_names(settings, sources) if settings.mine is not None else []  # and unknown mined ones
    dev_tasks = _dev_tasks(config, settings)  # and dev sets, and trackers whose package is missing

    from ray_e5.cluster import connect

    connect(config.ray_address)
    from ray_e5.capacity import Demand, check_fits

    check_fits([Demand("train.cpus_per_worker / train.use_gpu / train.num_workers", "training worker",
                       {"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})},
                       settings.num_workers)])
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_e5.data.batching import build_plan
    from ray_e5.train.loop import EMBEDDER_DIR, train_loop_per_worker
    from ray_e5.train.metrics import plot_loss_curve

    run = RunDir.of(config.run_dir)  # absolute: the workers run in another working directory
    train_dir = run.train
    mined = _mine(config, settings, sources, mined_names, train_dir) if settings.mine is not None else {}
    try:
        shares = ({"synthetic": settings.synthetic_share}
                  if settings.synthetic_share is not None and any(s.name == "synthetic" for s in sources) else None)
        plan = build_plan(sources, settings.batch_size, settings.epochs, settings.seed,
                          min_batch=max(4, settings.num_workers), multiple_of=settings.num_workers,
                          batch_by=settings.batch_by, rows=mined, shares=shares)
    except ValueError as err:
        raise ConfigError(f"train.sources: {err}") from None
    storage.makedirs(train_dir)
    data = plan.summary()
    storage.write_json(run.train_data, data)
    for name, s in plan.sources.items():
        skipped = "; ".join(f"{k}: {v}" for k, v in s["skipped"].items()) or "none"
        print(f"[ray-e5 train] source {name}: {s['rows']} rows, {s['valid']} valid, {s['used']} used per plan, "
              f"skipped {sum(s['skipped'].values())} ({skipped}), filtered {sum(s['filtered'].values())}")
    planned = sum(s["used"] for s in plan.sources.values())
    if "synthetic" in plan.sources and planned:
        used = plan.sources["synthetic"]["used"]
        print(f"[ray-e5 train] synthetic rows: {used} of {planned} examples planned ({100 * used / planned:.1f}%"
              + (f", weight {plan.sources['synthetic']['weight']:g} for train.synthetic_share "
                 f"{settings.synthetic_share:g}" if "weight" in plan.sources["synthetic"] else "") + ")")
    # Smaller batches let a small source contribute beside full ones; a plan of nothing but smaller batches means
    # the batch size does not fit the data at all.
    full = any(used >= settings.batch_size for st in plan.sources.values() for used in st["used_by_kind"].values())
    if plan.steps == 0 or not full:
        valid = sum(s["valid"] for s in plan.sources.values())
        raise ConfigError(f"train.batch_size: no full batch of {settings.batch_size} can be made from the data "
                          f"({valid} valid rows, batches hold one source and kind); lower train.batch_size")
    total_steps = min(plan.steps, settings.max_steps or plan.steps)
    fingerprint = _fingerprint(config, settings, sources, total_steps)
    name = _run_name(train_dir, settings, fingerprint)
    print(f"[ray-e5 train] {total_steps} steps of {settings.batch_size} examples on {settings.num_workers} "
          f"worker(s), engine {settings.engine}"
          + (f" ZeRO-{settings.zero_stage}" if settings.engine == "deepspeed" else "")
          + (f", gradient caching in chunks of {settings.chunk_size}" if settings.gradient_cache else ""))

    plan.dataset.context.enable_progress_bars = False  # the workers' own progress bar says where training is
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True  # row i of the plan is step i
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": settings.model_dump(), "model": model_settings(config).model_dump(),
                           "total_steps": total_steps, "deadline": deadline, "fingerprint": _digest(fingerprint),
                           "train_dir": train_dir, "dev_tasks": dev_tasks,
                           "tracking": _tracking(config, settings, name, total_steps)},
        scaling_config=ray.train.ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                               resources_per_worker={"CPU": settings.cpus_per_worker,
                                                                     **({"GPU": 1} if settings.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=_storage_path(train_dir),
            # the controller's own retries (a worker group that cannot start) are bounded too: unbounded, a
            # request the cluster can no longer meet would wait forever
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures,
                                                   controller_failure_limit=settings.max_failures),
            # keep_best: Ray Train ranks the checkpoints by the dev metric each one reports and keeps the best
            # keep_checkpoints of them, plus always the latest (what a restart resumes from)
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=settings.keep_checkpoints, checkpoint_score_attribute=settings.keep_best,
                checkpoint_score_order="max")),
        datasets={"train": plan.dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=options),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the Ray Train logs under {train_dir}/{name}")
    embedder_uri = run.embedder
    state = _state(result.checkpoint)
    published, published_state, best = result.checkpoint, state, None
    if settings.keep_best is not None:
        published = result.get_best_checkpoint(settings.keep_best, "max") or result.checkpoint
        published_state = _state(published)
        metrics = next((m for c, m in result.best_checkpoints or [] if c.path == published.path), {})
        best = {"metric": settings.keep_best, "value": metrics.get(settings.keep_best)}
    import shutil

    import pyarrow.fs as pafs

    staged = _stage_embedder(config, settings, published, data,
                             {"steps": state["step"], "planned_steps": total_steps,
                              "stopped_early": state.get("stopped_early")})
    try:
        # whole or absent: a training killed here leaves the previous embedder or none, never a half one
        storage.publish_dir(pafs.LocalFileSystem(), staged, embedder_uri, EMBEDDER_FILE)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    curve = plot_loss_curve(train_dir, title=f"{config.model.name}: {total_steps} steps x {settings.batch_size}")
    summary = {"steps": state["step"], "planned_steps": total_steps, "stopped_early": state.get("stopped_early"),
               "seconds": round(time.time() - started, 1), "embedder": embedder_uri, "loss_curve": curve,
               "run_name": name, "checkpoint": published.path,
               "published_step": int(published_state["step"]), **({"published_by": best} if best else {})}
    storage.write_json(run.train_summary, summary)
    chosen = (f" (the checkpoint of step {published_state['step']}: best {best['metric']} = {best['value']:.4f})"
              if best and best["value"] is not None else "")
    print(f"[ray-e5 train] {state['step']}/{total_steps} steps; embedder written to {embedder_uri}{chosen}"
          + (f"; loss curve {curve}" if curve else ""))
    return TrainResult(embedder_uri=embedder_uri, steps=int(state["step"]), local_dir=Path(run.local_embedder()),
                       summary=summary, data=data, published_step=int(published_state["step"]),
                       published_by=best)
