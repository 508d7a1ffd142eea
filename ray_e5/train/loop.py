"""The Ray Train worker loop: build the LoRA embedder, resume, stream global batches, step, log, checkpoint.

Every worker reads the same plan (one row per global batch, see ``ray_e5.data.batching``) and trains on its slice.
Row i of the plan is step i, so a worker restarted by Ray Train (FailureConfig) loads the latest checkpoint (adapter,
optimizer and schedule state, step) and skips the rows already trained on. Checkpoints go through
``ray.train.report``: each worker contributes its own files (DeepSpeed writes one optimizer partition per worker)
and Ray merges them into one checkpoint directory in the run's storage.
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


def _resume(engine, fingerprint: str, world: int) -> int:
    """Load the latest checkpoint of this run, if any; returns the step to continue from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
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
    return int(state["step"])


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from tqdm import tqdm

    from ray_e5.config import ModelSettings
    from ray_e5.train.config import TrainSettings
    from ray_e5.train.engines import build_embedder, fitted_horizon, make_engine, set_horizon
    from ray_e5.train.loss import build_loss
    from ray_e5.train.metrics import MetricsLog
    from ray_e5.train.step import prepare, train_step

    settings = TrainSettings.model_validate(config["train"])
    model_settings = ModelSettings.model_validate(config["model"])
    total_steps, deadline, fingerprint = config["total_steps"], config["deadline"], config["fingerprint"]
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

    torch.manual_seed(settings.seed)  # the same LoRA initialisation on every worker
    # ZeRO-3 partitions the backbone as it loads (each worker holds its share, not the whole model)
    embedder = build_embedder(model_settings, settings, settings.batch_size // world)
    embedder.train()
    engine = make_engine(embedder, settings, total_steps, model_settings.dtype, settings.batch_size // world, device)
    start = _resume(engine, fingerprint, world)
    log = MetricsLog(config["train_dir"], start) if rank == 0 else None
    if log is not None and start:
        log.log({"event": "resumed", "step": start, "time": time.time()})

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
        result = train_step(engine, embedder, texts, loss_fn, settings.chunk_size, settings.gradient_cache)
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
            log.log({"step": step, "epoch": int(row["epoch"]), "loss": round(loss, 6), "lr": lr,
                     "examples_per_s": round(len(row["query"]) / seconds, 3),
                     "tokens_per_s": round(float(shared[0]) / seconds, 1), "seconds": round(seconds, 4),
                     "source": row["source"], "kind": row["kind"], "time": time.time()})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step % settings.checkpoint_every == 0 or step == total_steps or stop:
            if log is not None:
                log.flush()
            _save_checkpoint(engine, embedder, {"step": step, "total_steps": total_steps, "fingerprint": fingerprint,
                                                "world_size": world, "engine": engine.name, "stopped_early": stop},
                             rank, {"step": step, "loss": loss})
            last_checkpoint = step
        if stop:
            break
    if step > last_checkpoint:  # the plan ran out before total_steps (it should not); keep what was trained
        _save_checkpoint(engine, embedder, {"step": step, "total_steps": total_steps, "fingerprint": fingerprint,
                                            "world_size": world, "engine": engine.name, "stopped_early": True},
                         rank, {"step": step})
    bar.close()
    if log is not None:
        log.close()
