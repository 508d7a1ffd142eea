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
    import mteb

    md = task.metadata
    record: dict[str, Any] = {"task": md.name, "type": md.type, "main_score": md.main_score,
                              "model": encoder.mteb_model_meta.name, "host": os.uname().nodename}
    start = time.perf_counter()
    try:
        result = mteb.evaluate(encoder, task, cache=None, co2_tracker=False, raise_error=True,
                               encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                               show_progress_bar=False, overwrite_strategy="always")
        if not result.task_results:
            raise RuntimeError(f"mteb returned no result for {md.name}: {result.exceptions}")
        task_result = result.task_results[0]
        record.update(status="ok", score=float(task_result.get_score()), splits=sorted(task_result.scores),
                      result=task_result.to_dict())
    except Exception as err:  # noqa: BLE001 - recorded, the other tasks go on
        log.warning("task %s failed: %s", md.name, err)
        record.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["instructions"] = {k.split(":", 1)[1]: v for k, v in encoder.seen.items() if k.startswith(md.name + ":")}
    return record


class EvalWorker:
    """A Ray actor holding one model; each MTEB task is one call to :meth:`run` (one Ray task per MTEB task)."""

    def __init__(self, spec, instructions: dict[str, str], torch_threads: int | None = None, use_gpu: bool = False):
        os.environ.setdefault("TQDM_DISABLE", "1")  # mteb's progress bars would flood the driver's log
        import torch

        if torch_threads:
            torch.set_num_threads(max(1, min(int(torch_threads), os.cpu_count() or 1)))
        from ray_e5.eval.encoder import E5Encoder

        model = spec.build()
        if use_gpu and torch.cuda.is_available() and hasattr(model, "to"):
            model = model.to("cuda")
        self.encoder = E5Encoder(model, spec.label, spec.instructions, instructions, revision=spec.fingerprint)

    def ready(self) -> dict[str, Any]:
        return {"host": os.uname().nodename, "pid": os.getpid(), "dimension": self.encoder.model.dimension}

    def run(self, task_spec, batch_size: int) -> dict[str, Any]:
        try:
            task = task_spec.build()
        except Exception as err:  # noqa: BLE001
            return {"task": task_spec.name, "type": task_spec.type, "status": "error",
                    "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(), "seconds": 0.0}
        return run_task(self.encoder, task, batch_size)
