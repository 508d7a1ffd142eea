"""The `evaluate:` section: which models, which tasks, how the work is spread over Ray, where results go.

```yaml
evaluate:
  models:
    - {label: trained, model: "{run_dir}/embedder"}        # the trained embedder of this run
    - {label: gemma3-270m, model: gemma3-270m}               # the base model
    - {label: minilm-l6, model: minilm-l6, max_length: 256} # the baseline to beat
  tasks:
    - stsbenchmark/                                          # a folder under data_dir (task.json + data files)
    - {path: scifact, max_samples: 100}                      # a folder under data_dir (or a URI), subsampled
    - STS12                                                  # an MTEB task by name (needs a reachable hub)
    - {path: sick, mteb: SICK-R}                             # the folder when present under data_dir, else mteb's
    - {hf: mteb/sickr-sts, split: test, type: sts}           # a Hugging Face dataset's rows as a local task
  num_workers: 2
```
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ray_e5.settings import Section

LOCAL_TYPES = ("sts", "retrieval", "classification", "pair_classification", "reranking", "bitext_mining")


class ModelEntry(Section):
    """One model to score. ``model`` is any Embedder reference (``{run_dir}`` is replaced by the run directory),
    the key every section spells a model reference with (``generate.model``, ``serve.model``, ``train.mine.model``);
    with ``endpoint`` set, vectors come from a running Serve deployment over HTTP instead (``model`` is then the
    served model name). The old key ``ref`` is still read, with a warning naming the new one, for one release."""

    model: str
    label: str | None = None  # default: derived from model
    instructions: Literal["auto"] | bool = "auto"  # auto: on for last-token (E5-style) models, off otherwise
    endpoint: str | None = None  # base URL of an OpenAI-compatible server (http://host:8000), /v1 optional
    # endpoint mode: "server" sends the instruction as ray-e5 Serve's `instruction` parameter (the server applies
    # its model's template); "client" wraps queries here in instruction_template, for any other server
    instruction_mode: Literal["server", "client"] = "server"
    instruction_template: str | None = None  # client mode (default: the E5 template)
    # Embedder overrides (ModelSettings fields), e.g. max_length: 256 for MiniLM as sentence-transformers uses
    pooling: Literal["last", "mean", "cls"] | None = None
    max_length: int | None = Field(None, gt=1)
    # auto: bf16 where the evaluating node runs it natively (AVX512-BF16/AMX CPU, CUDA), else fp32
    dtype: Literal["fp32", "bf16", "fp16", "auto"] | None = None
    normalize: bool | None = None
    rope_theta: float | None = Field(None, gt=0)  # long context: the RoPE base (model.rope_theta)
    sliding_window: int | None = Field(None, gt=0)  # long context: the attention window (model.sliding_window)

    @model_validator(mode="before")
    @classmethod
    def _ref_is_now_model(cls, data: Any) -> Any:
        """``ref`` (the key before this release) read as ``model``, with a FutureWarning naming the new key, so a
        config written for the old key still loads; remove after one release."""
        if isinstance(data, dict) and "ref" in data:
            data = dict(data)
            if "model" in data:
                raise ValueError("give the model reference once, as `evaluate.models[].model` (`ref` is its old name)")
            data["model"] = data.pop("ref")
            warnings.warn(f"evaluate.models[].ref is renamed: write `evaluate.models[].model: {data['model']}` "
                          "(`ref` is read for one more release)", FutureWarning, stacklevel=2)
        return data


class TaskEntry(Section):
    """One task: a local folder (``path``), an MTEB task name (``name`` alone, or ``mteb``), or a Hugging Face
    dataset (``hf`` with ``type``: its rows, columns mapped to the layout of the local ``type``). Strings in
    ``tasks`` are read as a folder when they contain a ``/`` or name an existing directory, else as an MTEB task
    name. With ``path`` and ``mteb`` or ``hf``, the folder under data_dir is read when present (a local mirror),
    the Hub otherwise."""

    path: str | None = None
    name: str | None = None  # MTEB name; for a local folder, the name it is reported under (default: folder name)
    mteb: str | None = None  # the MTEB task this entry is read as when its `path` is absent (or when it has none)
    hf: str | None = None  # a Hugging Face dataset id (or a local folder in the Hub's layout); needs `type`
    config: str | None = None  # the dataset's config (subset) name
    columns: dict[str, str] | None = None  # ours -> the dataset's (sts: sentence1, sentence2, score; ...)
    revision: str | None = None  # the dataset's git revision
    language: str | None = None  # hf: the rows' language (default en)
    split: str | None = None  # default: "test" for a local folder, the task's own eval splits for an MTEB task
    subsets: list[str] | None = None  # local multi-subset folders (languages): only these
    max_samples: int | None = Field(None, gt=0)  # seeded subsample: rows, or queries for retrieval/reranking
    max_corpus: int | None = Field(None, gt=0)  # retrieval: documents kept (every relevant one is always kept)
    # classification: mteb's probe is trained n times on 8 sampled texts per label (default 10); the union of the
    # samples is embedded, so fewer experiments embed fewer training texts (banking77: 6160 at 10, about 1850 at 3)
    n_experiments: int | None = Field(None, gt=0)
    instruction: str | None = None  # override the instruction table for this task
    main_score: str | None = None  # override mteb's main score for a local task
    # built-in tasks (no data to read): `type: passkey` is passkey retrieval at each of `lengths` (tokens), with
    # max_samples documents per length (default 10: chance is 0.1), the key at `depth` (None: seeded random)
    # with `hf`: the task type of the dataset's rows, one of the local types (retrieval needs three tables: name
    # its mteb task instead)
    type: Literal["passkey", "sts", "classification", "pair_classification", "reranking", "bitext_mining"] | None = None
    lengths: list[int] | None = None
    depth: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _path_or_name(self) -> "TaskEntry":
        if self.type == "passkey":
            if self.path:
                raise ValueError("a passkey task is built in: it takes no `path`")
            if self.lengths is not None and (not self.lengths or any(n < 32 for n in self.lengths)):
                raise ValueError(f"passkey `lengths` must list token counts of at least 32 (got {self.lengths})")
            if self.max_samples is not None and self.max_samples < 2:
                raise ValueError("passkey `max_samples` (documents per length) must be at least 2")
            return self
        if self.lengths is not None or self.depth is not None:
            raise ValueError("`lengths` and `depth` belong to `type: passkey` tasks")
        if self.hf and self.mteb:
            raise ValueError("give `hf` (a dataset read as a local task) or `mteb` (an MTEB task), not both")
        if self.hf and self.type is None:
            raise ValueError(f"an `hf` task needs `type`: one of {', '.join(t for t in LOCAL_TYPES if t != 'retrieval')}"
                             " (for retrieval, name its MTEB task with `mteb`)")
        if self.type is not None and not self.hf:
            raise ValueError(f"`type: {self.type}` applies to `hf` tasks (a local folder's type is in its task.json)")
        if (self.columns or self.config or self.revision) and not self.hf:
            raise ValueError("`columns`, `config` and `revision` describe an `hf` dataset: they need `hf`")
        if not self.path and not self.name and not self.mteb and not self.hf:
            raise ValueError("a task needs `path` (a local folder), `name` or `mteb` (an MTEB task name), `hf` (a "
                             "Hugging Face dataset, with `type`) or `type: passkey` (built in)")
        return self


class EvaluateSettings(Section):
    models: list[ModelEntry] = Field(default_factory=list)  # empty: <run_dir>/embedder if present, else model.name
    tasks: list[TaskEntry | str] = Field(default_factory=list)
    benchmark: str | None = None  # an mteb benchmark whose tasks are added, e.g. "MTEB(eng, v1)" (the paper's 56)
    output: str | None = None  # default: <run_dir>/eval
    # ---- scale ---------------------------------------------------------------------------------------------
    num_workers: int = Field(1, gt=0)  # Ray actors per model, each holding one copy of the model
    cpus_per_worker: float | None = Field(None, gt=0)  # default: the cluster's CPUs / num_workers
    gpus_per_worker: float = Field(0.0, ge=0)  # fractions share a GPU between workers (e.g. 0.5)
    torch_threads: int | None = Field(None, gt=0)  # per worker; default: cpus_per_worker
    max_restarts: int = Field(1, ge=0)  # a worker that dies is restarted this often; its task is retried once
    # A retrieval corpus of at least this many characters that alone outweighs one worker's share is embedded by
    # every worker at once, one shard each, before its task runs (ray_e5/evaluate/sharding.py); 0: never
    shard_min_chars: int = Field(1_000_000, ge=0)
    # ---- evaluation ----------------------------------------------------------------------------------------
    batch_size: int = Field(32, gt=0)
    seed: int = 42
    overwrite: bool = False  # ignore cached per-task results and run everything again
    instructions: dict[str, str] = Field(default_factory=dict)  # task name -> instruction override
    report: bool = True  # write report.json, report.md and scores.png
    # Matryoshka: also score every model at these widths (its vectors cut to the first d dimensions and
    # re-normalised), reported as `<label>@<d>` and in the report's score-against-width table and widths.png
    dimensions: list[int] = Field(default_factory=list)

    @field_validator("dimensions")
    @classmethod
    def _dimensions(cls, value: list[int]) -> list[int]:
        if any(d < 1 for d in value) or len(set(value)) != len(value):
            raise ValueError("must list distinct positive widths")
        return value

    def task_entries(self, data_dir: str | None = None) -> list[TaskEntry]:
        """The tasks as entries; a string is a folder when it holds a ``/`` or names a folder (under
        ``data_dir`` when given), else an MTEB task name."""
        from pathlib import Path

        def is_folder(item: str) -> bool:
            if data_dir is None or "://" in data_dir:
                return Path(item).is_dir()
            from ray_e5 import storage

            return Path(storage.data_uri(data_dir, item)).is_dir()

        out = []
        for item in self.tasks:
            if isinstance(item, TaskEntry):
                out.append(item)
            elif "/" in item or is_folder(item):
                out.append(TaskEntry(path=item))
            else:
                out.append(TaskEntry(name=item))
        return out
