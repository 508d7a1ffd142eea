"""Helpers for tests and benchmarks of the training step: real gloo process groups on local processes.

``spawn(fn, world, ...)`` runs ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group (the
CPU backend Ray Train and DeepSpeed use here) and returns each rank's result. ``step_gradients`` is such an ``fn``:
one training step on a tiny decoder with LoRA, returning the loss and the worker-averaged gradients.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any) -> list[Any]:
    """``[fn(rank, world, *args) for rank in range(world)]``, each in its own process of one gloo group."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world, free_port(), fn, args, out), nprocs=world, join=True)
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def settings(**overrides) -> SimpleNamespace:
    """Train settings for engine tests (a namespace, so that lr may be 0: gradients without moving the weights)."""
    base = dict(lr=1e-3, weight_decay=0.0, warmup_steps=0, grad_clip=None, engine="torch", zero_stage=0,
                offload_optimizer=False, use_gpu=False, deepspeed={})
    base.update(overrides)
    return SimpleNamespace(**base)


def lora_embedder(model_dir: str, seed: int = 0, max_length: int = 64):
    """A tiny-decoder Embedder with LoRA (no dropout) whose B matrices are random too, so every adapter weight
    gets a gradient (peft starts B at zero)."""
    from ray_e5.config import LoraSettings, ModelSettings
    from ray_e5.model import Embedder

    torch.manual_seed(seed)
    embedder = Embedder.from_settings(ModelSettings(name=model_dir, max_length=max_length,
                                                    lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    embedder.train()
    return embedder


def step_gradients(rank: int, world: int, model_dir: str, row: dict, engine_settings: dict,
                   variants: list, temperature: float = 0.05, cross_device: bool = True) -> dict:
    """Loss and worker-averaged gradients of one step on ``row``, once per (chunk_size, gradient_cache) entry of
    ``variants``. The engine steps with lr 0 between runs, so every run sees the same weights."""
    from ray_e5.train.engines import make_engine
    from ray_e5.train.step import prepare, train_step

    embedder = lora_embedder(model_dir)
    opts = settings(**{**engine_settings, "lr": 0.0})
    engine = make_engine(embedder, opts, total_steps=10, dtype="fp32", micro_batch=len(row["query"]) // world)
    texts = prepare(row, rank, world, embedder.settings.instruction_template, cross_device=cross_device)
    runs = []
    for chunk, cache in variants:
        result = train_step(engine, engine.module, texts, temperature, cross_device=cross_device, chunk_size=chunk,
                            gradient_cache=cache)
        runs.append({"loss": result.loss, "grads": engine.full_gradients(), "tokens": result.tokens})
        engine.step()
    # ZeRO-3 leaves each worker an empty local tensor for a partitioned parameter (outside forward and backward).
    partitioned = sum(1 for _, p in engine.named if p.numel() == 0 and getattr(p, "ds_numel", 0) > 0)
    return {"runs": runs, "partitioned": partitioned, "trainable": len(engine.named)}
