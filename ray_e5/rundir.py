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
        """The trained embedder's URI when training has published one, else None. An interrupted publish (files
        under ``embedder/`` but no manifest, as an object store holds it mid-publish, or a local publish's hidden
        leftovers with no ``embedder/``) raises :class:`runs.StorageError`: falling back to the base model there
        would serve or score the untrained model under the trained one's name."""
        if runs.exists(runs.join(self.embedder, EMBEDDER_FILE)):
            return self.embedder
        files = runs.listing(self.embedder)
        leftovers = []
        if runs.is_local(self.uri) and runs.exists(self.uri):
            import os

            root = runs.resolve(self.uri)[1]
            leftovers = [n for n in os.listdir(root) if n.startswith((".embedder.publish-", ".embedder.old-"))]
        if files or (leftovers and not runs.exists(self.embedder)):
            raise runs.StorageError(
                f"{self.embedder}: the trained embedder is incomplete (no {EMBEDDER_FILE}"
                f"{'; ' + str(len(files)) + ' other files' if files else ''}"
                f"{'; leftovers ' + ', '.join(sorted(leftovers)) if leftovers else ''}): its publish was interrupted "
                "(a training stopped while writing it, or one still writing it). Rerun `ray-e5 train` on this run "
                "directory (it resumes from its last checkpoint and publishes again), or name a model explicitly")
        return None

    def local_embedder(self) -> str:
        """A local directory holding the trained embedder (a cached copy when the run dir is remote)."""
        return runs.local_copy(self.embedder)
