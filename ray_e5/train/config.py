"""The `train:` section: data sources and their weights, the contrastive loss, the optimiser, scale and limits.

Defaults follow the paper (Wang et al. 2024): temperature 0.02, lr 1e-4 with 100 warmup steps and linear decay,
weight decay 0.1, one epoch, in-batch + hard + cross-device negatives. The batch size is global: the examples of
one optimiser step over all workers (the paper's 2048), reached on small memory through gradient caching
(``gradient_cache`` with ``chunk_size``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ray_e5.evaluate.config import TaskEntry
from ray_e5.settings import Section


# The fields a source's `columns` may map: a triplet, a scored pair, a labeled text, and the row's own task/kind.
SOURCE_FIELDS = ("query", "positive", "negative", "sentence1", "sentence2", "score", "text", "label", "task", "kind",
                 "language")


class SourceSettings(Section):
    """One labeled training source: a JSONL file (or a folder holding train.jsonl / Parquet shards).

    Rows are triplets (``query``, ``positive``, optional ``negative``, optional ``task``) or pairs
    (``sentence1``, ``sentence2``, optional ``score``; with ``min_score`` set, pairs scoring lower are left out).

    ``loss``: ``contrastive`` (InfoNCE: each query against its positive, in-batch and hard negatives) or
    ``cosent`` (CoSENT, Su 2022, as in AnglE and sentence-transformers' ``CoSENTLoss``: the cosines of a batch's
    pairs ranked as their gold scores rank, every pair of the source kept with its score). CoSENT learns graded
    similarity, which InfoNCE on the best-scored pairs cannot: what STS and pair-classification tasks measure.
    A cosent source must hold scored pairs; list the same file twice (two names) to train it both ways.

    Where the rows come from: ``path`` (under ``data_dir``, or a URI), ``hf`` (a Hugging Face dataset, read with
    ``datasets.load_dataset(hf, config, split=split)``, its columns mapped to ours by ``columns``), or both: then
    ``data_dir/path`` is read when present (a local mirror of the same rows) and the Hub otherwise::

        - {hf: sentence-transformers/all-nli, config: triplet, split: train, path: snli_triplets/train.jsonl,
           columns: {query: anchor, positive: positive, negative: negative}}
    """

    path: str | None = None
    hf: str | None = None  # Hugging Face dataset id (or a local folder in the Hub's layout)
    config: str | None = None  # the dataset's config (subset) name
    split: str = "train"  # the dataset's split (hf only)
    columns: dict[str, str] | None = None  # ours -> the dataset's: query/positive/negative, sentence1/2 + score, text + label
    revision: str | None = None  # the dataset's git revision (hf only)
    name: str | None = None  # default: the folder (or file stem) name, else the dataset's name
    weight: float = Field(1.0, gt=0.0)  # fraction of the source used per epoch (> 1 repeats it)
    task: str | None = None  # instruction for rows without one; default: the folder's task.json instruction_hint
    kind: str = "labeled"
    language: str = "en"
    min_score: float | None = None
    loss: Literal["contrastive", "cosent"] = "contrastive"

    @model_validator(mode="after")
    def _path_or_hf(self) -> "SourceSettings":
        if not self.path and not self.hf:
            raise ValueError("a source needs `path` (a file or folder under data_dir, or a URI) or `hf` (a Hugging "
                             "Face dataset id), or both (the path is a local mirror of the dataset)")
        if self.columns is not None and not self.hf:
            raise ValueError("`columns` maps a Hugging Face dataset's columns: it needs `hf`")
        unknown = sorted(set(self.columns or {}) - set(SOURCE_FIELDS))
        if unknown:
            raise ValueError(f"columns: {', '.join(unknown)} {'is not a field' if len(unknown) == 1 else 'are not fields'}"
                             f" of a training row; accepted (ours -> the dataset's): {', '.join(SOURCE_FIELDS)}")
        return self


class MineSettings(Section):
    """``train.mine``: hard negatives mined with an embedder before the plan is cut (ray_e5.data.mining)."""

    sources: list[str] | None = None  # source names to mine (None: every source; "synthetic" is the generated one)
    model: str | None = None  # embedder directory or URI to mine with (None: the run's base model, no LoRA)
    top_k: int = Field(30, gt=0)  # candidates considered per query, after skip_top
    skip_top: int = Field(0, ge=0)  # best-ranked candidates passed over (often unlabeled positives)
    relative_margin: float = Field(0.05, ge=0.0, lt=1.0)  # a negative scores <= (1 - margin) x the positive
    sampling: Literal["top", "random"] = "top"  # the best passing candidate, or a seeded random one of the top_k
    replace: bool = False  # also replace negatives rows already have (default: fill only rows without one)
    # Ray Data encoder actors and their CPUs (None: train.num_workers / train.cpus_per_worker, the resources the
    # training workers take next, free while mining runs)
    num_workers: int | None = Field(None, gt=0)
    cpus_per_worker: float | None = Field(None, gt=0.0)
    batch_size: int = Field(64, gt=0)


class DistillSettings(Section):
    """``train.distill``: score distillation from a frozen teacher embedder, added to each batch's loss.

    For every query of a batch, the teacher's softmax over the batch's documents (its cosines over ``temperature``)
    is the target of the student's (its cosines over ``train.temperature``): KL(teacher || student), times
    ``weight``. It teaches how similar every pair of the batch is, not only which document is the match; matching
    scores, not vectors, needs no projection between the two models' widths. The teacher embeds the raw texts (no
    instruction), without gradients, on the training worker."""

    teacher: str = "minilm-l6"  # a packaged name, a Hugging Face id, or an embedder directory the workers can read
    weight: float = Field(1.0, gt=0.0)
    temperature: float = Field(0.05, gt=0.0)  # the teacher's softmax temperature over its cosines
    max_length: int = Field(256, gt=1)  # the teacher's token limit


#: what ``train.report_to`` accepts: the trackers Ray Train integrates with
TRACKERS = ("mlflow", "tensorboard", "wandb")
#: ``train.eval_tasks`` when a config names none: an STS dev split and a retrieval subset
DEFAULT_EVAL_TASKS = (
    {"path": "stsbenchmark", "split": "dev", "hf": "mteb/stsbenchmark-sts", "type": "sts", "max_samples": 200},
    {"path": "scifact", "max_samples": 20, "max_corpus": 200},
)


def eval_task_name(entry: TaskEntry) -> str:
    """The name a dev task's metrics are reported under (``dev/<name>_<metric>``), as the evaluate stage names it."""
    if entry.name:
        return entry.name
    if entry.path:
        return entry.path.rstrip("/").rsplit("/", 1)[-1]
    return (entry.hf or entry.mteb or "").rstrip("/").rsplit("/", 1)[-1] + (f"-{entry.config}" if entry.config else "")


class TrainSettings(Section):
    # ---- data ------------------------------------------------------------------------------------------------
    synthetic: bool = True  # use <run_dir>/synthetic/*.parquet when present
    synthetic_weight: float = Field(1.0, gt=0.0)
    # the fraction of planned examples that are synthetic rows (repeated as needed); replaces synthetic_weight
    synthetic_share: float | None = Field(None, gt=0.0, lt=1.0)
    sources: list[SourceSettings] = Field(default_factory=list)
    epochs: int = Field(1, gt=0)
    seed: int = 0
    mine: MineSettings | None = None  # hard-negative mining before planning (None: off)
    # ---- loss ------------------------------------------------------------------------------------------------
    batch_size: int = Field(64, gt=1)  # global: examples per optimiser step over all workers
    batch_by: Literal["kind", "task"] = "kind"  # a batch holds one source's kind, or one kind's task (instruction)
    chunk_size: int | None = Field(None, gt=0)  # texts per forward pass, grouped by length (None: all at once)
    gradient_cache: bool = False  # embed chunks without a graph first: memory of one chunk, any batch size
    # keep what leaves the layers below model.lora.top_layers for each text and replay it when the text comes again
    # (ray_e5/train/layer_cache.py): repeated texts pay only for the adapted layers; torch engine only
    cache_frozen_layers: bool = False
    cache_max_gb: float = Field(4.0, gt=0.0)  # memory the kept states may take per worker
    temperature: float = Field(0.02, gt=0.0)  # InfoNCE's; CoSENT's scale is its inverse (0.05: the usual 20)
    hard_negatives: bool = True
    cross_device_negatives: bool = True
    mask_false_negatives: bool = True
    symmetric_loss: bool = False  # InfoNCE both ways: each query over the documents and each positive over the queries
    # Matryoshka: also train the first d components of each embedding (re-normalised) for each d listed, e.g.
    # [64, 128, 256, 640]; the loss is the sum of InfoNCE at every width. Empty: the full width only.
    matryoshka_dims: list[int] = Field(default_factory=list)
    distill: DistillSettings | None = None  # score distillation from a teacher embedder (None: off)
    # ---- optimiser -------------------------------------------------------------------------------------------
    lr: float = Field(1e-4, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    # ---- scale -----------------------------------------------------------------------------------------------
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    torch_threads: int | None = Field(None, gt=0)  # per worker; default: cpus_per_worker
    engine: Literal["deepspeed", "torch"] = "deepspeed"
    # torch engine on CPU: forward passes under bf16 autocast ("auto": only where the CPU has AVX512-BF16 or AMX,
    # which run bf16 matmuls natively; elsewhere bf16 is emulated and slower). Embeddings and the loss stay fp32.
    cpu_autocast: Literal["off", "auto", "bf16"] = "off"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # ZeRO optimizer states in CPU memory
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # extra DeepSpeed config, merged over the generated one
    # ---- limits, checkpoints, logging ------------------------------------------------------------------------
    max_steps: int | None = Field(None, gt=0)  # cap on optimiser steps (the schedule is fitted to it)
    max_time_s: float | None = Field(None, gt=0.0)  # wall-time cap; stops cleanly, saving what is trained
    fit_schedule_to_time: bool = True  # with max_time_s: the lr decay ends at the step the time limit will stop at
    checkpoint_every: int = Field(100, gt=0)  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(3, ge=-1)  # worker failures to recover from (-1: unlimited)
    resume: bool = True  # continue from the run directory's latest checkpoint when there is one
    log_every: int = Field(1, gt=0)
    progress: bool = True
    # ---- experiment tracking (ray_e5.train.tracking) ---------------------------------------------------------
    # any of mlflow, tensorboard, wandb: rank 0 logs the config, loss, lr, throughput and dev scores to each
    report_to: list[str] = Field(default_factory=list)
    mlflow_tracking_uri: str | None = None  # default: a file store at <run_dir>/train/mlruns
    mlflow_experiment: str = "ray-e5"
    wandb_project: str | None = None  # default: ray-e5 (offline without WANDB_API_KEY or with WANDB_MODE=offline)
    # ---- evaluation during training (ray_e5.train.deveval) ---------------------------------------------------
    eval_every: int | None = None  # steps between dev evaluations on rank 0 (and one at the last step); 0/None: off
    # the dev sets, as evaluate.tasks entries (local folders under data_dir, or hf datasets with a type), read on
    # the driver; keep them small: training waits while rank 0 scores them
    eval_tasks: list[TaskEntry] = Field(default_factory=lambda: [TaskEntry(**t) for t in DEFAULT_EVAL_TASKS])
    eval_batch_size: int = Field(32, gt=0)
    # publish the checkpoint with the best value of this dev metric (dev/mean or dev/<task>_<metric>), not the last
    keep_best: str | None = None

    @model_validator(mode="after")
    def _cache_needs_the_torch_engine(self) -> "TrainSettings":
        if self.cache_frozen_layers and self.engine != "torch":
            raise ValueError("cache_frozen_layers needs engine: torch (DeepSpeed gathers each layer's weights in "
                             "hooks a replayed layer would skip); set train.engine=torch or cache_frozen_layers=false")
        return self

    @field_validator("matryoshka_dims")
    @classmethod
    def _widths(cls, dims: list[int]) -> list[int]:
        if any(d <= 0 for d in dims):
            raise ValueError(f"widths must be > 0, got {dims}")
        return sorted(set(dims))

    @field_validator("num_workers")
    @classmethod
    def _batch_splits_over_workers(cls, value: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and batch % value:
            raise ValueError(f"batch_size ({batch}) must be a multiple of num_workers ({value}): "
                             "each worker takes an equal slice of every global batch")
        return value

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))}: not a tracker; accepted: {', '.join(TRACKERS)} "
                             "(any of them, as a list)")
        return list(dict.fromkeys(names))

    @field_validator("eval_every", mode="before")
    @classmethod
    def _eval_every(cls, value: Any) -> Any:
        if value is None or value == 0:
            return None  # off
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"must be >= 1 (steps between dev evaluations), or 0/null for none; got {value}")
        return value

    @field_validator("eval_tasks")
    @classmethod
    def _dev_tasks(cls, entries: list[TaskEntry]) -> list[TaskEntry]:
        if any(e.type == "passkey" for e in entries):
            raise ValueError("passkey tasks are not scored during training; list task folders (path) or hf datasets "
                             "(hf with type)")
        return entries

    @field_validator("keep_best")
    @classmethod
    def _keep_best_names_a_dev_metric(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.data.get("eval_every") is None:
            raise ValueError(f"{value!r} needs train.eval_every (steps between dev evaluations, >= 1): without "
                             "evaluations there is no best checkpoint")
        names = [eval_task_name(e) for e in info.data.get("eval_tasks") or []]
        if value != "dev/mean" and not any(value.startswith(f"dev/{n}_") for n in names):
            accepted = ", ".join(["dev/mean"] + [f"dev/{n}_<metric>" for n in names])
            raise ValueError(f"{value!r} is not a metric the dev evaluation produces; accepted: {accepted} (e.g. "
                             "dev/stsbenchmark_spearman, dev/scifact_ndcg_at_10)")
        return value
