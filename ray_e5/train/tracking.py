"""Experiment tracking (``train.report_to``): one :class:`Tracker` that fans each ``log(step, metrics)`` out to the
enabled backends, MLflow, TensorBoard and Weights & Biases, from rank 0 only.

- **MLflow** through Ray's own integration, ``ray.air.integrations.mlflow.setup_mlflow`` (it logs the config as
  the run's params, creates the experiment, and returns the ``mlflow`` module with the run active). It works in a
  Ray Train V2 worker: it asks ``ray.train.get_context()`` for the rank. Default store: a local file store at
  ``<run_dir>/train/mlruns`` (``train.mlflow_tracking_uri`` names any other: a server, ``sqlite:///...``). MLflow 3
  keeps its file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE=true``, which is set here for it (a
  reader of that store sets it too, e.g. ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri ...``); it
  needs no database driver, so ``mlflow-skinny`` is enough.
- **TensorBoard** through ``torch.utils.tensorboard.SummaryWriter`` into ``<run_dir>/train/tensorboard``: torch's
  writer is maintained with torch (already a dependency), and it needs the ``tensorboard`` package, which is also
  what reads the logs back (``tensorboard --logdir``, ``EventAccumulator``); tensorboardX is only present here as
  another package's dependency, so nothing of ours should rest on it.
- **W&B** through Ray's ``ray.air.integrations.wandb.setup_wandb`` (project ``train.wandb_project``, default
  ray-e5); offline when ``WANDB_MODE=offline`` or when the driver had no ``WANDB_API_KEY``. The key is read on the
  driver and handed over as a secret (never among the logged params), as generation does with its API keys. Its
  rank check reads Ray Train V1's session, which a V2 worker does not have: it would start a run on every worker,
  so the tracker is only ever built on rank 0 (:func:`open_tracker`).

A run directory on an object store (``s3://``, ``gs://``): the backends write into a local temporary folder on the
worker, which :meth:`Tracker.sync` copies under ``<run_dir>/train/`` at every checkpoint and at the end. A worker
restarted by Ray Train continues the same MLflow and W&B runs (their ids travel in the checkpoint's state), and
TensorBoard hides the events after the step it resumes from (``purge_step``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from ray_e5 import storage
from ray_e5.settings import ConfigError

log = logging.getLogger("ray_e5.train")

MLRUNS_DIR = "mlruns"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
INSTALL = "pip install 'ray-e5[tracking]'"
_NEEDS = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboard", "tensorboard"),
          "wandb": ("wandb", "wandb")}


def check_installed(report_to: list[str]) -> None:
    """A ConfigError naming the missing package and how to install it, for every tracker that cannot be imported
    (run on the driver before any work, and again on the worker that logs)."""
    import importlib.util

    missing = [(name, _NEEDS[name][1]) for name in report_to if importlib.util.find_spec(_NEEDS[name][0]) is None]
    if missing:
        packages = ", ".join(f"{name} needs the {package} package" for name, package in missing)
        extra = INSTALL if any(name != "wandb" for name, _ in missing) else "pip install wandb"
        raise ConfigError(f"train.report_to: {packages}; install it with `{extra}`"
                          + (" (and `pip install wandb` for wandb)" if extra == INSTALL and
                             any(name == "wandb" for name, _ in missing) else ""))


def _is_file_store(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file:")


class _MLflow:
    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict, run_id: str | None):
        from ray.air.integrations.mlflow import setup_mlflow

        if _is_file_store(tracking_uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if run_id:  # a restarted worker: continue the run its checkpoint names (mlflow.start_run reads this)
            os.environ["MLFLOW_RUN_ID"] = run_id
        kwargs = dict(tracking_uri=tracking_uri, experiment_name=experiment, run_name=run_name,
                      create_experiment_if_not_exists=True, rank_zero_only=False)
        try:
            self.mlflow = setup_mlflow(params, **kwargs)
        except Exception as err:  # noqa: BLE001 - the run to continue is gone (another store): start a new one
            if not run_id:
                raise
            log.warning("train.report_to: mlflow run %s cannot be continued (%s); starting a new run", run_id, err)
            os.environ.pop("MLFLOW_RUN_ID", None)
            self.mlflow = setup_mlflow(params, **kwargs)
        self.run_id = self.mlflow.active_run().info.run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.mlflow.end_run()
        os.environ.pop("MLFLOW_RUN_ID", None)


class _TensorBoard:
    def __init__(self, log_dir: str, params: dict, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: after a restart, the events logged past the checkpoint (trained again now) are hidden
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=resume_step or None)
        if not resume_step:
            import json

            self.writer.add_text("config", "```json\n" + json.dumps(params, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, project: str, run_id: str, run_name: str, params: dict, api_key: str | None, directory: str):
        from ray.air.integrations.wandb import setup_wandb

        if not api_key:  # no key on the driver: log offline (`wandb sync` uploads the folder later)
            os.environ["WANDB_MODE"] = "offline"
        os.makedirs(directory, exist_ok=True)
        # rank_zero_only=False: its rank check reads Ray Train V1's session (absent in V2); only rank 0 gets here
        self.run = setup_wandb(params, api_key=api_key, rank_zero_only=False, project=project, id=run_id,
                               name=run_name, dir=directory)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """The enabled backends behind one ``log(step, metrics)``; ``sync`` copies local logs to a remote run directory,
    ``close`` ends every run (and syncs). ``state`` is what a restarted worker needs to continue the same runs."""

    def __init__(self, backends: dict[str, Any], local_root: str | None = None, remote_root: str | None = None,
                 folders: tuple[str, ...] = ()):
        self.backends = backends
        self.local_root, self.remote_root, self.folders = local_root, remote_root, folders
        self.closed = False

    @property
    def state(self) -> dict[str, str]:
        mlflow = self.backends.get("mlflow")
        return {"mlflow_run_id": mlflow.run_id} if mlflow is not None else {}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, backend in self.backends.items():
            try:
                backend.log(step, numbers)
            except Exception as err:  # noqa: BLE001 - a tracker's hiccup must not stop training
                log.warning("train.report_to: %s could not log step %d: %s", name, step, err)

    def sync(self) -> None:
        """Flush every backend; with a remote run directory, copy the local log folders under it."""
        for backend in self.backends.values():
            backend.flush()
        if self.remote_root is None:
            return
        import pyarrow.fs as pafs

        fs, root = storage.resolve(self.remote_root)
        for folder in self.folders:
            local = os.path.join(self.local_root, folder)
            if os.path.isdir(local):
                pafs.copy_files(local, f"{root.rstrip('/')}/{folder}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for name, backend in self.backends.items():
            try:
                backend.close()
            except Exception as err:  # noqa: BLE001
                log.warning("train.report_to: %s did not close cleanly: %s", name, err)
        self.sync()
        if self.remote_root is not None and self.local_root:
            shutil.rmtree(self.local_root, ignore_errors=True)


def _download(remote_root: str, local_root: str, folders: list[str]) -> None:
    import pyarrow.fs as pafs

    fs, root = storage.resolve(remote_root)
    for folder in folders:
        if storage.exists(storage.join(remote_root, folder)):
            pafs.copy_files(f"{root.rstrip('/')}/{folder}", os.path.join(local_root, folder), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())


def open_tracker(settings, train_dir: str, run_name: str, params: dict, state: dict | None = None,
                 resume_step: int = 0, wandb_api_key: str | None = None) -> Tracker | None:
    """The Tracker of ``settings.report_to`` (None when it is empty), logging ``params`` once; call on rank 0 only.

    ``train_dir`` is ``<run_dir>/train``, local or remote; ``state`` the previous ``Tracker.state`` (a restart)."""
    if not settings.report_to:
        return None
    check_installed(settings.report_to)
    state = state or {}
    remote = not storage.is_local(train_dir)
    root = tempfile.mkdtemp(prefix="ray-e5-tracking-") if remote else storage.resolve(train_dir)[1]
    if remote and resume_step:  # a restarted worker on another machine: continue the logs synced so far
        _download(train_dir, root, [f for f in (MLRUNS_DIR, TENSORBOARD_DIR, WANDB_DIR)])
    backends: dict[str, Any] = {}
    folders = []
    try:
        if "mlflow" in settings.report_to:
            uri = settings.mlflow_tracking_uri
            if uri is None:
                folders.append(MLRUNS_DIR)
                uri = "file://" + os.path.join(root, MLRUNS_DIR)
            backends["mlflow"] = _MLflow(uri, settings.mlflow_experiment, run_name, params, state.get("mlflow_run_id"))
        if "tensorboard" in settings.report_to:
            folders.append(TENSORBOARD_DIR)
            backends["tensorboard"] = _TensorBoard(os.path.join(root, TENSORBOARD_DIR, run_name), params, resume_step)
        if "wandb" in settings.report_to:
            folders.append(WANDB_DIR)
            backends["wandb"] = _Wandb(settings.wandb_project or "ray-e5", run_name, run_name, params, wandb_api_key,
                                       os.path.join(root, WANDB_DIR))
    except Exception:
        Tracker(backends).close()
        raise
    return Tracker(backends, root if remote else None, train_dir if remote else None, tuple(folders))
