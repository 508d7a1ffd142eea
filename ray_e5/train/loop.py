"""The Ray Train worker loop: build the LoRA embedder, resume, stream global batches, step, log, checkpoint.

Every worker reads the same plan (one row per global batch, see ``ray_e5.data.batching``) and trains on its slice.
Row i of the plan is step i, so a worker restarted by Ray Train (FailureConfig) loads the latest checkpoint (adapter,
optimizer and schedule state, step) and skips the rows already trained on. Checkpoints go through
``ray.train.report``: each worker contributes its own files (DeepSpeed writes one optimizer partition per worker)
and Ray merges them into one checkpoint directory in the run's storage.

Rank 0 also logs to the trackers of ``train.report_to`` (:mod:`ray_e5.train.tracking`) and, every
``train.eval_every`` steps, scores the dev sets with the embedder being trained (:mod:`ray_e5.train.deveval`); the
scores go to metrics.jsonl (an ``eval`` event line), the trackers, and the metrics of the checkpoint that follows,
which is what ``train.keep_best`` ranks checkpoints by.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

STATE_FILE = "train_state.json"
EMBEDDER_DIR = "embedder"


def _save_checkpoint(engine, embedder, state: dict, rank: int, metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="ray_e5_ckpt_") as tmp:
        directory = Path(tmp)
        if engine.name == "deepspeed":  # DeepSpeed creates its folders on rank 0 only; each worker writes here
            (directory / "deepspeed" / "state").mkdir(parents=True)
        engine.save(directory)
        with engine.gathered():
            if rank == 0:
                embedder.save(directory / EMBEDDER_DIR)
        if rank == 0:
            (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 or engine.per_rank_state else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{state['step']:07d}")


def _resume(engine, fingerprint: str, world: int) -> tuple[int, dict]:
    """Load the latest checkpoint of this run, if any; returns the step to continue from and its saved state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as tmp:
        directory = Path(tmp)
        state = json.loads((directory / STATE_FILE).read_text())
        if state.get("fingerprint") != fingerprint:
            raise RuntimeError("the checkpoint to resume from was written by a run with other data or settings; "
                               "set train.resume=false to start afresh")
        if engine.per_rank_state and state.get("world_size") != world:
            raise RuntimeError(f"the checkpoint holds DeepSpeed state for {state.get('world_size')} workers, this run "
                               f"has {world}; keep train.num_workers as it was to resume")
        engine.load(directory)
    return int(state["step"]), state


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from ray_e5.config import ModelSettings
    from ray_e5.train.config import TrainSettings
    from ray_e5.train.engines import build_embedder, make_engine
    from ray_e5.train.metrics import MetricsLog

    settings = TrainSettings.model_validate(config["train"])
    model_settings = ModelSettings.model_validate(config["model"])
    total_steps, fingerprint = config["total_steps"], config["fingerprint"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if settings.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(settings.torch_threads or max(1, int(settings.cpus_per_worker)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    teacher = None
    if settings.distill is not None:
        # loaded before the student: under ZeRO-3 the student's load config would partition the teacher too
        from ray_e5.model import Embedder
        from ray_e5.train.teacher import TeacherVectors

        teacher = Embedder.load(settings.distill.teacher, max_length=settings.distill.max_length).to(device)
        teacher.eval().requires_grad_(False)
        teacher = TeacherVectors(teacher)  # a text seen again reuses its vector
    torch.manual_seed(settings.seed)  # the same LoRA initialisation on every worker
    # ZeRO-3 partitions the backbone as it loads (each worker holds its share, not the whole model)
    embedder = build_embedder(model_settings, settings, settings.batch_size // world)
    embedder.train()
    engine = make_engine(embedder, settings, total_steps, model_settings.dtype, settings.batch_size // world, device)
    start, saved = _resume(engine, fingerprint, world)
    if settings.cache_frozen_layers:
        from ray_e5.train.layer_cache import FrozenLayerCache

        engine = FrozenLayerCache(engine, embedder, int(settings.cache_max_gb * (1 << 30)))
    log = MetricsLog(config["train_dir"], start) if rank == 0 else None
    if log is not None and start:
        log.log({"event": "resumed", "step": start, "time": time.time()})
    tracking = config.get("tracking") or {}
    tracker = None
    if rank == 0 and settings.report_to:
        from ray_e5.train.tracking import open_tracker

        key = tracking.get("wandb_api_key")
        tracker = open_tracker(settings, config["train_dir"], tracking["run_name"], tracking["params"],
                               saved.get("tracking"), start, key.get_secret_value() if key is not None else None)
    dev_tasks = config.get("dev_tasks") or []
    # ZeRO-3 gathers each layer's weights collectively in every forward: all workers embed the dev texts in
    # lockstep (the same calls, in the same order), rank 0 keeps the scores. Otherwise rank 0 evaluates alone and
    # the others wait for it in the checkpoint's collectives (or the next step's all-reduce).
    evaluates = bool(dev_tasks) and (rank == 0 or (engine.name == "deepspeed" and settings.zero_stage == 3))

    def evaluate(step: int) -> dict:
        if not evaluates:
            return {}
        from ray_e5.train.deveval import evaluate as score

        began = time.perf_counter()
        with engine.precision():  # as the training's forwards (the frozen weights may be held in bf16)
            scores = score(embedder, dev_tasks, settings.eval_batch_size)  # eval mode, no grad; train mode after
        seconds = time.perf_counter() - began
        if log is not None:
            log.log({"event": "eval", "step": step, **{k: round(v, 6) for k, v in scores.items()},
                     "seconds": round(seconds, 3), "time": time.time()})
        if tracker is not None:
            tracker.log(step, {**scores, "dev/seconds": seconds})
        return scores if rank == 0 else {}

    def checkpoint(step: int, stopped_early: bool, metrics: dict) -> None:
        if log is not None:
            log.flush()
        if tracker is not None:
            tracker.sync()
        _save_checkpoint(engine, embedder, {"step": step, "total_steps": total_steps, "fingerprint": fingerprint,
                                            "world_size": world, "engine": engine.name, "stopped_early": stopped_early,
                                            "tracking": tracker.state if tracker is not None else {}},
                         rank, metrics)

    try:
        _train(settings, model_settings, config, engine, embedder, rank, world, start, log, tracker, dev_tasks,
               evaluate, checkpoint, teacher)
    finally:
        if tracker is not None:
            tracker.close()


def _train(settings, model_settings, config, engine, embedder, rank, world, start, log, tracker, dev_tasks, evaluate,
           checkpoint, teacher=None) -> None:
    import ray.train
    from tqdm import tqdm

    from ray_e5.train.engines import fitted_horizon, set_horizon
    from ray_e5.train.loss import build_loss
    from ray_e5.train.step import prepare, train_step

    total_steps, deadline = config["total_steps"], config["deadline"]
    template = model_settings.instruction_template
    loss_fn = build_loss(settings)
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", mininterval=5.0, dynamic_ncols=False,
               disable=rank != 0 or not settings.progress)
    step, last_checkpoint, stop = 0, start, False
    first_began, stepped = None, 0  # this session's steps, for the time-fitted lr horizon
    for row in ray.train.get_dataset_shard("train").iter_rows():
        if step >= total_steps:
            break
        if step < start:  # trained before the restart
            step += 1
            continue
        began = time.perf_counter()
        first_began = first_began or began
        texts = prepare(row, rank, world, template, settings.hard_negatives, loss_fn.cross_device,
                        loss_fn.mask_false_negatives)
        result = train_step(engine, embedder, texts, loss_fn, settings.chunk_size, settings.gradient_cache, teacher)
        lr = engine.lr()
        engine.step()
        step += 1
        stepped += 1
        # One small all-reduce: tokens over workers, the loss, and rank 0's decisions on the time limit: stop now,
        # and the step the lr decay should end at (the steps that fit before the deadline at the pace so far).
        out_of_time = rank == 0 and deadline is not None and time.time() >= deadline
        horizon = 0.0
        fit = deadline is not None and settings.fit_schedule_to_time
        if rank == 0 and fit:
            horizon = float(fitted_horizon(step, total_steps, (time.perf_counter() - first_began) / stepped,
                                           deadline - time.time()))
        shared = torch.tensor([float(result.tokens), result.loss, float(out_of_time), horizon], device=engine.device)
        if world > 1:
            dist.all_reduce(shared)
        stop = bool(shared[2] > 0)
        if fit:
            set_horizon(engine.scheduler, int(shared[3]))
        seconds = time.perf_counter() - began
        loss = float(shared[1]) / world
        if log is not None and (step % settings.log_every == 0 or step == total_steps or stop):
            record = {"loss": round(loss, 6), "lr": lr, "examples_per_s": round(len(row["query"]) / seconds, 3),
                      "tokens_per_s": round(float(shared[0]) / seconds, 1)}
            if settings.cache_frozen_layers:  # the share of texts so far whose frozen layers were replayed
                record["replayed"] = round(engine.hits / max(1, engine.hits + engine.misses), 4)
            log.log({"step": step, "epoch": int(row["epoch"]), **record, "seconds": round(seconds, 4),
                     "source": row["source"], "kind": row["kind"], "time": time.time()})
            if tracker is not None:
                tracker.log(step, record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        # Every rank takes the same decisions (the step, `stop` from the all-reduce): evaluations and checkpoints
        # line up. With keep_best every checkpoint is scored (Ray Train ranks checkpoints by the metric each one
        # reports), and a checkpoint follows every evaluation.
        last = step == total_steps or stop
        eval_due = bool(dev_tasks) and (step % settings.eval_every == 0 or last)
        saving = step % settings.checkpoint_every == 0 or last or (settings.keep_best is not None and eval_due)
        scores = evaluate(step) if eval_due or (saving and settings.keep_best is not None) else {}
        if saving:
            checkpoint(step, stop, {"step": step, "loss": loss, **scores})
            last_checkpoint = step
        if stop:
            break
    if step > last_checkpoint:  # the plan ran out before total_steps (it should not); keep what was trained
        scores = evaluate(step) if dev_tasks else {}
        checkpoint(step, True, {"step": step, **scores})
    bar.close()
    if log is not None:
        log.close()
