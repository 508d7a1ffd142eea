"""Training engines: DeepSpeed ZeRO (stages 0-3, bf16/fp16, optimizer offload) or plain torch, behind one interface.

The step code calls ``embed`` (a forward), ``backward(scalar, boundary)`` any number of times, then ``step``. Several
backward calls per optimiser step are what gradient caching needs, and what the known implementations get wrong
under ZeRO: they call ``tensor.backward()`` per chunk, outside DeepSpeed's accounting. Under ZeRO-2 that silently
yields wrong gradients (on the tiny test decoder, DeepSpeed 0.19.8, two gloo workers: off by 9.7 where the largest
gradient is 8.8). Here every chunk goes through ``engine.backward`` as a micro-step of gradient accumulation whose
boundary we set ourselves (``set_gradient_accumulation_boundary``), unscaled (``scale_wrt_gas=False``), so ZeRO-2/3
accumulate each chunk's gradient into their partitions and reduce once per step, as for ordinary accumulation
(tests/test_train_step.py checks the gradients against the uncached step under both stages).

The torch engine all-reduces the (LoRA-sized) gradients once per step itself, which works for any number of backward
calls; it needs no build step and is the lighter choice for one CPU worker.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from ray_e5.model.precision import cpu_has_native_bf16
from ray_e5.train.loss import distributed


class WarmupLinearDecay:
    """The lr factor at a step: linear warmup to the peak over ``warmup`` steps, then linear decay to zero at
    ``horizon`` (transformers' linear schedule), with a horizon that training may move.

    A run capped by ``max_time_s`` does not know how many steps it will reach; with the horizon fixed at the plan's
    length it would stop near the peak lr, before any decay. The loop re-fits the horizon from the measured step
    time (:func:`fitted_horizon`), so the decay ends where the time limit will. A callable object rather than a
    function, because ``LambdaLR.state_dict`` saves such objects' attributes: a resumed run keeps its horizon.
    """

    def __init__(self, warmup: int, horizon: int):
        self.horizon = max(int(horizon), 1)
        self.warmup = min(int(warmup), max(self.horizon - 1, 0))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        return max(0.0, float(self.horizon - step) / float(max(1, self.horizon - self.warmup)))


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup, then linear decay to zero at ``total_steps`` (or at the horizon the loop fits later)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(warmup_steps, total_steps))


def fitted_horizon(step: int, total_steps: int, seconds_per_step: float, seconds_left: float) -> int:
    """The last step a time-capped run will reach: the steps that start before the deadline, at most the plan."""
    if seconds_per_step <= 0:
        return total_steps
    return int(min(total_steps, step + max(1, -(-max(seconds_left, 0.0) // seconds_per_step))))


def set_horizon(scheduler, horizon: int) -> None:
    """Move the decay's end of every parameter group's schedule (no effect on a schedule of another kind)."""
    for factor in getattr(scheduler, "lr_lambdas", ()):
        if isinstance(factor, WarmupLinearDecay):
            factor.horizon = max(int(horizon), factor.warmup + 1)


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a CPU forward under ``train.cpu_autocast``, or None for plain fp32."""
    if device.type != "cpu" or mode == "off" or (mode == "auto" and not cpu_has_native_bf16()):
        return None
    return torch.bfloat16


def hold_frozen_linears_in(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the weights (and biases) of ``module``'s frozen ``nn.Linear`` layers in ``dtype``.

    Under autocast every matmul casts its weight to the autocast dtype, and the cast is cached only for leaf tensors
    that require grad: a frozen base weight (all of them under LoRA) is cast again in every forward of every chunk.
    Held in the autocast dtype already, it is used as is: the same rounding, so the same outputs and gradients, and
    less memory traffic (on the one-hour recipe's step, 2-core CPU with AVX512-BF16: ``bench/bench_train_levers.py``).
    Norms and embeddings keep their dtype (they run outside autocast's casts, and the residual stream stays float32).
    """
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and not any(p.requires_grad for p in layer.parameters(recurse=False)):
            for p in layer.parameters(recurse=False):
                p.data = p.data.to(dtype)


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class TorchEngine:
    """Plain torch: AdamW on the trainable (LoRA) parameters, gradients averaged over workers once per step."""

    name = "torch"
    per_rank_state = False  # rank 0's state is everyone's

    def __init__(self, module: torch.nn.Module, settings, total_steps: int, device: torch.device | None = None):
        self.module = module.to(device) if device is not None else module
        self.settings = settings
        self.named = trainable_parameters(self.module)
        self.params = [p for _, p in self.named]
        if distributed()[1] > 1:  # start every worker from rank 0's adapter, as DDP does
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, 0)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = linear_schedule(self.optimizer, settings.warmup_steps, total_steps)
        self.autocast = autocast_dtype(getattr(settings, "cpu_autocast", "off"), self.device)
        if self.autocast is not None:
            hold_frozen_linears_in(self.module, self.autocast)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def precision(self) -> contextlib.AbstractContextManager:
        """The context every forward of the module runs in (the frozen weights are held in the autocast dtype):
        the training's own forwards and the dev evaluations."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        with self.precision():
            return self.module(**inputs).float()

    def backward(self, scalar: torch.Tensor, boundary: bool = True) -> None:
        scalar.backward()

    def _averaged_grads(self) -> list[torch.Tensor]:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        _, world = distributed()
        if world == 1:
            return grads
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return out

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """The worker-averaged gradient of every trainable parameter (collective; before ``step``)."""
        return {n: g.detach().clone() for (n, _), g in zip(self.named, self._averaged_grads())}

    def step(self) -> None:
        for p, g in zip(self.params, self._averaged_grads()):
            p.grad = g
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        yield

    def save(self, directory: Path) -> None:
        if distributed()[0] == 0:
            torch.save({"params": {n: p.detach().cpu() for n, p in self.named},
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       directory / "torch_state.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "torch_state.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def deepspeed_config(settings, dtype: str, micro_batch: int) -> dict:
    """The DeepSpeed config for a train section; one optimiser step per global batch (accumulation is ours)."""
    zero: dict = {"stage": settings.zero_stage, "contiguous_gradients": True, "overlap_comm": bool(settings.use_gpu)}
    if settings.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we save the (gathered) adapter ourselves
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(settings.use_gpu)}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "auto_cast": False},
        "gradient_clipping": float(settings.grad_clip or 0.0),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, getattr(settings, "deepspeed", None) or {})


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` merged into ``base``, nested mappings key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def zero3_load_config(settings, dtype: str, micro_batch: int):
    """Under ZeRO-3, the object that makes ``from_pretrained`` partition the model as it builds and loads it.

    transformers' DeepSpeed integration (``HfDeepSpeedConfig``) registers the DeepSpeed config behind a weakref:
    while the object is alive, ``from_pretrained`` creates every parameter inside ``deepspeed.zero.Init`` (each one
    partitioned over the workers the moment it is created) and loads the checkpoint one module at a time (the
    module's parameters gathered, rank 0 copying the values in, partitioned again). A worker so holds its share of
    the weights plus one module's, never the whole model: without it, each of a node's workers would materialise the
    full model (7.24e9 parameters: 14.5 GB in bf16) before ``deepspeed.initialize`` partitions it.

    Returns None for any other engine or stage. The caller keeps the object alive for the model's lifetime
    (:func:`build_embedder` stores it on the Embedder), as the weakref requires.
    """
    if getattr(settings, "engine", None) != "deepspeed" or getattr(settings, "zero_stage", None) != 3:
        return None
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(settings, dtype, micro_batch))


def build_embedder(model_settings, settings, micro_batch: int):
    """The Embedder a training worker trains, built so that ZeRO-3 partitions it at load (see
    :func:`zero3_load_config`); any other engine builds it as ``Embedder.from_settings`` does."""
    from ray_e5.model import Embedder

    hf_config = zero3_load_config(settings, model_settings.dtype, micro_batch)
    embedder = Embedder.from_settings(model_settings)
    if hf_config is not None:
        embedder._zero3_load_config = hf_config  # transformers holds only a weakref: keep it as long as the model
    return embedder


class DeepSpeedEngine:
    """DeepSpeed ZeRO; every worker saves its own optimizer partition into the checkpoint."""

    name = "deepspeed"
    per_rank_state = True

    def __init__(self, module: torch.nn.Module, settings, total_steps: int, dtype: str, micro_batch: int):
        import deepspeed

        self.settings = settings
        named = trainable_parameters(module)
        params = [p for _, p in named]
        if settings.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=settings.lr, weight_decay=settings.weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(settings, dtype, micro_batch),
            lr_scheduler=lambda opt: linear_schedule(opt, settings.warmup_steps, total_steps))
        self.module = self.engine.module
        self.named = trainable_parameters(self.module)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.engine(**{k: v.to(self.device) for k, v in batch.items()})

    def backward(self, scalar: torch.Tensor, boundary: bool = True) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(scalar, scale_wrt_gas=False)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """The worker-averaged gradient of every trainable parameter (collective; after the boundary backward)."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for n, p in self.named:
            g = safe_get_full_grad(p)
            out[n] = g.detach().float().clone() if g is not None else None
        return out

    def step(self) -> None:
        self.engine.step()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def precision(self) -> contextlib.AbstractContextManager:
        """DeepSpeed casts the module itself (bf16/fp16 in its config): nothing around a forward."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full trainable parameters on every worker for the duration (ZeRO-3 partitions them)."""
        if self.settings.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in self.named], modifier_rank=None):
                yield
        else:
            yield

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"no DeepSpeed state under {directory / 'deepspeed'}")


def make_engine(module: torch.nn.Module, settings, total_steps: int, dtype: str, micro_batch: int,
                device: torch.device | None = None):
    if settings.engine == "deepspeed":
        return DeepSpeedEngine(module, settings, total_steps, dtype, micro_batch)
    return TorchEngine(module, settings, total_steps, device)
