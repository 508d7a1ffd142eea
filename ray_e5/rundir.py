"""The run directory's layout, in one place: every stage reads and writes through :class:`RunDir`.

    <run_dir>/synthetic/   generate: Parquet shards, manifest.json, brainstorm.json, journal/, llamacpp.log
    <run_dir>/train/       train: data.json, run.json, metrics.jsonl, loss.png, summary.json, Ray Train checkpoints
    <run_dir>/embedder/    train: the trained embedder (ray_e5.json + adapter/), what serve and evaluate load
    <run_dir>/eval/        evaluate: report.md, report.json, scores.png, per-task results

A run directory is a local path or a URI (s3://, gs://); local paths are made absolute here, on the driver, so a
remote task (another working directory) is handed a path that means the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_e5 import runs

EMBEDDER_FILE = "ray_e5.json"  # the file that makes a directory an embedder (see ray_e5.model)


@dataclass(frozen=True)
class RunDir:
    uri: str

    @classmethod
    def of(cls, run_dir: str) -> "RunDir":
        return cls(runs.resolve(run_dir)[1] if runs.is_local(run_dir) else run_dir.rstrip("/"))

    def join(self, *parts: str) -> str:
        return runs.join(self.uri, *parts)

    @property
    def synthetic(self) -> str:
        return self.join("synthetic")

    @property
    def train(self) -> str:
        return self.join("train")

    @property
    def embedder(self) -> str:
        return self.join("embedder")

    @property
    def eval(self) -> str:
        return self.join("eval")

    def trained_embedder(self) -> str | None:
        """The trained embedder's URI when training has written one, else None."""
        return self.embedder if runs.exists(runs.join(self.embedder, EMBEDDER_FILE)) else None

    def local_embedder(self) -> str:
        """A local directory holding the trained embedder (a cached copy when the run dir is remote)."""
        return runs.local_copy(self.embedder)
