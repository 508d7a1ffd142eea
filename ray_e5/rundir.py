"""The run directory's layout, in one place: every path under a run directory is named here, and every stage reads
and writes through :class:`RunDir` (the storage underneath, local or object store, is :mod:`ray_e5.storage`).

    <run_dir>/synthetic/   generate: Parquet shards, manifest.json, brainstorm.json, journal/, llamacpp.log
    <run_dir>/train/       train: data.json, run.json, metrics.jsonl, loss.png, summary.json, Ray Train checkpoints
    <run_dir>/embedder/    train: the trained embedder (ray_e5.json + adapter/), what serve and evaluate load
    <run_dir>/eval/        evaluate: report.md, report.json, scores.png, per-task results
    <run_dir>/leases/      <stage>.json: the lease of the one driver writing that stage's folder

A run directory is a local path or a URI (s3://, gs://); local paths are made absolute here, on the driver, so a
remote task (another working directory) is handed a path that means the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_e5 import storage

SYNTHETIC_DIR = "synthetic"
TRAIN_DIR = "train"
EMBEDDER_DIR = "embedder"
EVAL_DIR = "eval"
LEASES_DIR = "leases"
EMBEDDER_FILE = "ray_e5.json"  # the file that makes a directory an embedder (see ray_e5.model)
MANIFEST_FILE = "manifest.json"  # synthetic/: what generation wrote, dropped and spent
CONSISTENCY_FILE = "consistency.json"  # synthetic/: the rows a reference embedder disagreed with (id -> reason)
DATA_FILE = "data.json"  # train/: the batch plan
RUN_FILE = "run.json"  # train/: the Ray Train run's name and fingerprint
SUMMARY_FILE = "summary.json"  # train/: steps, stopped early or not, seconds, the embedder URI
METRICS_FILE = "metrics.jsonl"  # train/: one line per step
CURVE_FILE = "loss.png"  # train/: the loss curve


@dataclass(frozen=True)
class RunDir:
    uri: str

    @classmethod
    def of(cls, run_dir: str) -> "RunDir":
        return cls(storage.resolve(run_dir)[1] if storage.is_local(run_dir) else run_dir.rstrip("/"))

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    @property
    def synthetic(self) -> str:
        return self.join(SYNTHETIC_DIR)

    @property
    def train(self) -> str:
        return self.join(TRAIN_DIR)

    @property
    def embedder(self) -> str:
        return self.join(EMBEDDER_DIR)

    @property
    def eval(self) -> str:
        return self.join(EVAL_DIR)

    @property
    def leases(self) -> str:
        return self.join(LEASES_DIR)

    def lease(self, stage: str) -> str:
        return self.join(LEASES_DIR, f"{stage}.json")

    @property
    def manifest(self) -> str:
        """``synthetic/manifest.json``."""
        return self.join(SYNTHETIC_DIR, MANIFEST_FILE)

    @property
    def train_data(self) -> str:
        """``train/data.json``."""
        return self.join(TRAIN_DIR, DATA_FILE)

    @property
    def train_run(self) -> str:
        """``train/run.json``."""
        return self.join(TRAIN_DIR, RUN_FILE)

    @property
    def train_summary(self) -> str:
        """``train/summary.json``."""
        return self.join(TRAIN_DIR, SUMMARY_FILE)

    def trained_embedder(self) -> str | None:
        """The trained embedder's URI when training has published one, else None. An interrupted publish (files
        under ``embedder/`` but no manifest, as an object store holds it mid-publish, or a local publish's hidden
        leftovers with no ``embedder/``) raises :class:`storage.StorageError`: falling back to the base model there
        would serve or score the untrained model under the trained one's name."""
        if storage.exists(storage.join(self.embedder, EMBEDDER_FILE)):
            return self.embedder
        files = storage.listing(self.embedder)
        leftovers = []
        if storage.is_local(self.uri) and storage.exists(self.uri):
            import os

            root = storage.resolve(self.uri)[1]
            leftovers = [n for n in os.listdir(root) if n.startswith((f".{EMBEDDER_DIR}.publish-", f".{EMBEDDER_DIR}.old-"))]
        if files or (leftovers and not storage.exists(self.embedder)):
            raise storage.StorageError(
                f"{self.embedder}: the trained embedder is incomplete (no {EMBEDDER_FILE}"
                f"{'; ' + str(len(files)) + ' other files' if files else ''}"
                f"{'; leftovers ' + ', '.join(sorted(leftovers)) if leftovers else ''}): its publish was interrupted "
                "(a training stopped while writing it, or one still writing it). Rerun `ray-e5 train` on this run "
                "directory (it resumes from its last checkpoint and publishes again), or name a model explicitly")
        return None

    def local_embedder(self) -> str:
        """A local directory holding the trained embedder (a cached copy when the run dir is remote)."""
        return storage.local_copy(self.embedder)
