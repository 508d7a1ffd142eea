"""Helpers for tests and benchmarks of the training step: real gloo process groups on local processes.

``spawn(fn, world, ...)`` runs ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group (the
CPU backend Ray Train and DeepSpeed use here) and returns each rank's result. ``step_gradients`` is such an ``fn``:
one training step on a tiny decoder with LoRA, returning the loss and the worker-averaged gradients.
``settings(...)`` and ``lora_embedder(...)`` build what an engine takes; ``PeakSampler``, ``model_bytes`` and
``zero3_load_memory`` measure the memory a ZeRO-3 load needs (``tests/test_train_zero3.py``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ray_e5.net import free_port



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


def lora_embedder(model_dir: str, seed: int = 0, max_length: int = 64, engine_settings=None):
    """A tiny-decoder Embedder with LoRA (no dropout) whose A and B matrices are drawn from ``seed`` after the build,
    so every adapter weight gets a gradient (peft starts B at zero) and the adapter is the same however the backbone
    was built (under ZeRO-3 ``engine_settings`` it is partitioned at load, see ``engines.build_embedder``)."""
    from ray_e5.config import LoraSettings, ModelSettings
    from ray_e5.train.engines import build_embedder

    model_settings = ModelSettings(name=model_dir, max_length=max_length, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    embedder = build_embedder(model_settings, engine_settings or settings(), micro_batch=1)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(embedder.named_parameters()):
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    embedder.train()
    return embedder


def step_gradients(rank: int, world: int, model_dir: str, row: dict, engine_settings: dict,
                   variants: list, loss) -> dict:
    """Loss and worker-averaged gradients of one step of ``loss`` (a ``ray_e5.train.loss.Loss``) on ``row``, once
    per (chunk_size, gradient_cache) entry of ``variants``. The engine steps with lr 0 between runs, so every run
    sees the same weights."""
    from ray_e5.train.engines import make_engine
    from ray_e5.train.step import prepare, train_step

    opts = settings(**{**engine_settings, "lr": 0.0})
    embedder = lora_embedder(model_dir, engine_settings=opts)
    engine = make_engine(embedder, opts, total_steps=10, dtype="fp32", micro_batch=len(row["query"]) // world)
    texts = prepare(row, rank, world, embedder.settings.instruction_template, cross_device=loss.cross_device,
                    mask_false_negatives=loss.mask_false_negatives)
    runs = []
    for chunk, cache in variants:
        result = train_step(engine, engine.module, texts, loss, chunk_size=chunk, gradient_cache=cache)
        runs.append({"loss": result.loss, "grads": engine.full_gradients(), "tokens": result.tokens})
        engine.step()
    # ZeRO-3 leaves each worker an empty local tensor for a partitioned parameter (outside forward and backward).
    partitioned = sum(1 for _, p in engine.named if p.numel() == 0 and getattr(p, "ds_numel", 0) > 0)
    return {"runs": runs, "partitioned": partitioned, "trainable": len(engine.named),
            "zero3_load": getattr(embedder, "_zero3_load_config", None) is not None}


# ---- memory of a ZeRO-3 load -----------------------------------------------------------------------------------
def _status_kb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB (VmRSS, VmHWM, RssAnon, ...)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0])
    return out


class PeakSampler:
    """The peak of a process's anonymous resident memory (RssAnon: heap and tensors, not the file pages of an
    mmap-ed checkpoint, which are the page cache's), sampled every ``interval_s`` on a thread."""

    def __init__(self, interval_s: float = 0.001):
        import threading

        self.interval_s, self.peak_kb = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon")["RssAnon"])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakSampler":
        self.peak_kb = _status_kb("RssAnon")["RssAnon"]
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon")["RssAnon"])


def model_bytes(model_dir: str) -> dict[str, int]:
    """Parameter bytes of a saved model (fp32 on load): the whole model and its largest decoder layer."""
    import re

    from safetensors import safe_open

    per_layer: dict[str, int] = {}
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():
                shape = fh.get_slice(name).get_shape()
                size = 4
                for d in shape:
                    size *= d
                total += size
                match = re.search(r"layers\.(\d+)\.", name)
                if match:
                    per_layer[match.group(1)] = per_layer.get(match.group(1), 0) + size
    return {"model": total, "layer": max(per_layer.values(), default=0)}


def zero3_load_memory(rank: int, world: int, model_dir: str, partition_at_load: bool) -> dict:
    """Build the LoRA Embedder and its ZeRO-3 engine as a training worker does, measuring this process's memory.

    ``partition_at_load``: through :func:`ray_e5.train.engines.build_embedder` (``zero.Init`` at load); False: the
    plain ``Embedder.from_settings`` then ``deepspeed.initialize``, which partitions only after a full load.
    Returns, in bytes above the baseline taken after every import: the sampled anonymous peak while loading
    (``load_peak``) and over loading and ``deepspeed.initialize`` (``anon_peak``), the exact resident peak (``hwm_peak``: VmHWM, which counts the checkpoint's mmap-ed pages that rank 0 reads), and
    the parameter bytes this worker holds afterwards (``local_param_bytes``). Run it with
    ``MALLOC_MMAP_THRESHOLD_`` fixed (e.g. 262144) in the workers' environment: glibc's moving threshold otherwise
    keeps freed multi-MB blocks in its heap, and resident memory then counts memory that nothing holds.
    """
    import gc

    import deepspeed  # noqa: F401  everything imported before the baseline
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModel  # noqa: F401

    from ray_e5.config import LoraSettings, ModelSettings
    from ray_e5.model import Embedder
    from ray_e5.train.engines import DeepSpeedEngine, build_embedder

    opts = settings(engine="deepspeed", zero_stage=3)
    model_settings = ModelSettings(name=model_dir, max_length=32, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    torch.ones(1024, 1024).sum()  # the allocator and thread pools up before the baseline
    gc.collect()
    base = _status_kb("VmRSS", "RssAnon")
    with PeakSampler() as loading:
        if partition_at_load:
            embedder = build_embedder(model_settings, opts, micro_batch=1)
        else:
            embedder = Embedder.from_settings(model_settings)
        gc.collect()
    with PeakSampler() as initializing:
        engine = DeepSpeedEngine(embedder, opts, total_steps=1, dtype="fp32", micro_batch=1)
        gc.collect()
    hwm = _status_kb("VmHWM")["VmHWM"]
    local = 0
    for p in engine.module.parameters():
        held = getattr(p, "ds_tensor", None)
        local += (held if held is not None else p).numel() * p.element_size()
    partitioned = sum(1 for p in engine.module.parameters() if getattr(p, "ds_numel", 0) > 0 and p.numel() == 0)
    return {"load_peak": (loading.peak_kb - base["RssAnon"]) * 1024,
            "anon_peak": (max(loading.peak_kb, initializing.peak_kb) - base["RssAnon"]) * 1024,
            "hwm_peak": (hwm - base["VmRSS"]) * 1024,
            "local_param_bytes": local, "partitioned": partitioned,
            "parameters": sum(1 for _ in engine.module.parameters())}
