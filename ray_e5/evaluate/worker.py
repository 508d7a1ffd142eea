"""Running one MTEB task on one model, in this process or in a Ray worker, with mteb's own evaluators.

A task's outcome is a plain dict (a *record*): ``status`` ok or error, the main score, mteb's full TaskResult,
the instructions used, timings. Errors are caught and recorded, so one failing task never loses the others.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any

log = logging.getLogger(__name__)


def run_task(encoder, task, batch_size: int = 32) -> dict[str, Any]:
    """Evaluate ``encoder`` (an E5Encoder) on an mteb task; never raises, returns a record."""
    if getattr(task, "is_passkey", False):  # built in: not an mteb task
        return task.run(encoder, batch_size=min(batch_size, 8))
    import mteb

    md = task.metadata
    record: dict[str, Any] = {"task": md.name, "type": md.type, "main_score": md.main_score,
                              "model": encoder.mteb_model_meta.name, "host": os.uname().nodename, "pid": os.getpid()}
    start = time.perf_counter()
    try:
        result = mteb.evaluate(encoder, task, cache=None, co2_tracker=False, raise_error=True,
                               encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                               show_progress_bar=False, overwrite_strategy="always")
        if not result.task_results:
            raise RuntimeError(f"mteb returned no result for {md.name}: {result.exceptions}")
        task_result = result.task_results[0]
        record.update(status="ok", score=float(task_result.get_score()), splits=sorted(task_result.scores),
                      result=task_result.to_dict(), dimension=int(encoder.model.dimension))
    except Exception as err:  # noqa: BLE001 - recorded, the other tasks go on
        log.warning("task %s failed: %s", md.name, err)
        record.update(status="error", error=f"task {md.name!r}: {type(err).__name__}: {err}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["instructions"] = {k.split(":", 1)[1]: v for k, v in encoder.seen.items() if k.startswith(md.name + ":")}
    return record


class EvalWorker:
    """A Ray actor that evaluates (model, task) pairs; each MTEB task is one call to :meth:`run`.

    The worker keeps the model of its last call loaded, and the driver sends work model by model, so each worker
    loads each model once and a whole evaluation starts only ``num_workers`` processes. A model that cannot be
    loaded fails its tasks (with the load error) without killing the worker.
    """

    def __init__(self, instructions: dict[str, str], torch_threads: int | None = None, use_gpu: bool = False):
        os.environ.setdefault("TQDM_DISABLE", "1")  # mteb's progress bars would flood the driver's log
        import torch

        if torch_threads:
            torch.set_num_threads(max(1, min(int(torch_threads), os.cpu_count() or 1)))
        self.instructions = instructions
        self.use_gpu = use_gpu
        self.key: tuple[str, str] | None = None
        self.encoder = None
        self.load_error: str | None = None
        self.base_key: str | None = None  # the loaded full-width model, reused across evaluate.dimensions
        self.base = None

    def _load(self, spec) -> None:
        key = (spec.label, spec.fingerprint)
        if key == self.key:
            return
        import gc

        import torch

        from ray_e5.evaluate.encoder import E5Encoder

        self.key, self.encoder, self.load_error = key, None, None
        try:
            model_key = spec.model_key
            if model_key != self.base_key:
                self.base_key, self.base = None, None
                gc.collect()  # free the previous model before loading the next
                base = spec.build_base()
                if self.use_gpu and torch.cuda.is_available() and hasattr(base, "to"):
                    base = base.to("cuda")
                self.base_key, self.base = model_key, base
            model = spec.build(self.base)
            self.encoder = E5Encoder(model, spec.label, spec.instructions, self.instructions,
                                     revision=spec.fingerprint)
        except Exception as err:  # noqa: BLE001 - every task of this model reports it
            self.load_error = f"model {spec.label!r} ({spec.ref}) could not be loaded: {type(err).__name__}: {err}"

    def encode_documents(self, spec, texts: list[str], batch_size: int):
        """One shard of a retrieval corpus embedded as documents (no instruction), float32 rows in ``texts``
        order (see :mod:`ray_e5.evaluate.sharding`). Raises when the model cannot be loaded."""
        import numpy as np

        self._load(spec)
        if self.encoder is None:
            raise RuntimeError(self.load_error)
        return np.asarray(self.encoder.model.encode(texts, instruction=None, batch_size=batch_size), dtype=np.float32)

    def run(self, spec, task_spec, batch_size: int, *shard_vectors) -> dict[str, Any]:
        """Evaluate one task; ``shard_vectors`` (one array per corpus shard, from :meth:`encode_documents`) stand
        in for embedding the corpus here."""
        self._load(spec)
        failed = {"task": task_spec.name, "type": task_spec.type, "status": "error", "seconds": 0.0,
                  "pid": os.getpid(), "host": os.uname().nodename}
        if self.encoder is None:
            return {**failed, "error": self.load_error}
        try:
            task = task_spec.build()
        except Exception as err:  # noqa: BLE001
            return {**failed, "error": f"task {task_spec.name!r}: {type(err).__name__}: {err}",
                    "traceback": traceback.format_exc()}
        if not shard_vectors:
            return run_task(self.encoder, task, batch_size)
        from ray_e5.evaluate.sharding import PrecomputedDocuments, corpus_texts, shards

        model = self.encoder.model
        documents = PrecomputedDocuments(model, shards(corpus_texts(task), len(shard_vectors)), shard_vectors)
        self.encoder.model = documents
        try:
            record = run_task(self.encoder, task, batch_size)
        finally:
            self.encoder.model = model
        record.update(corpus_shards=len(shard_vectors), precomputed_documents=documents.hits)
        return record
