"""The `train:` section: data sources and their weights, the contrastive loss, the optimiser, scale and limits.

Defaults follow the paper (Wang et al. 2024): temperature 0.02, lr 1e-4 with 100 warmup steps and linear decay,
weight decay 0.1, one epoch, in-batch + hard + cross-device negatives. The batch size is global: the examples of
one optimiser step over all workers (the paper's 2048), reached on small memory through gradient caching
(``gradient_cache`` with ``chunk_size``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

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


class TrainSettings(Section):
    # ---- data ------------------------------------------------------------------------------------------------
    synthetic: bool = True  # use <run_dir>/synthetic/*.parquet when present
    synthetic_weight: float = Field(1.0, gt=0.0)
    sources: list[SourceSettings] = Field(default_factory=list)
    epochs: int = Field(1, gt=0)
    seed: int = 0
    mine: MineSettings | None = None  # hard-negative mining before planning (None: off)
    # ---- loss ------------------------------------------------------------------------------------------------
    batch_size: int = Field(64, gt=1)  # global: examples per optimiser step over all workers
    batch_by: Literal["kind", "task"] = "kind"  # a batch holds one source's kind, or one kind's task (instruction)
    chunk_size: int | None = Field(None, gt=0)  # texts per forward pass, grouped by length (None: all at once)
    gradient_cache: bool = False  # embed chunks without a graph first: memory of one chunk, any batch size
    temperature: float = Field(0.02, gt=0.0)  # InfoNCE's; CoSENT's scale is its inverse (0.05: the usual 20)
    hard_negatives: bool = True
    cross_device_negatives: bool = True
    mask_false_negatives: bool = True
    symmetric_loss: bool = False  # InfoNCE both ways: each query over the documents and each positive over the queries
    # Matryoshka: also train the first d components of each embedding (re-normalised) for each d listed, e.g.
    # [64, 128, 256, 640]; the loss is the sum of InfoNCE at every width. Empty: the full width only.
    matryoshka_dims: list[int] = Field(default_factory=list)
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
