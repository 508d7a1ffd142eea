"""What a generation run keeps under ``<run_dir>/synthetic`` (a local path or a cloud URI):

    part-<run>-<n>.parquet   the examples (the training-example contract + provenance), written atomically
    brainstorm.json          the task definitions per brainstorm group, frozen once the brainstorm step finishes
    manifest.json            counts by kind and language, drops by reason, tokens, cost, wall time; rewritten at
                             every shard, so a killed run leaves a true account of what it wrote

A shard is written under a ``.tmp`` name and then moved into place, so a kill never leaves half a shard that a
rerun (or the trainer) would read.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_e5 import storage
from ray_e5.rundir import MANIFEST_FILE
from ray_e5.generate.backends import token_count

SCHEMA = pa.schema([("id", pa.string()), ("task", pa.string()), ("kind", pa.string()), ("language", pa.string()),
                    ("query", pa.string()), ("positive", pa.string()), ("negative", pa.string()),
                    ("backend", pa.string()), ("model", pa.string()), ("prompt_id", pa.string()),
                    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
COLUMNS = tuple(SCHEMA.names)


class Store:
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        storage.makedirs(out_dir)
        self.fs, self.path = storage.resolve(out_dir)
        self.run_tag = f"{int(time.time() * 1000):x}"
        self.shard_index = 0

    # ---- shards ----------------------------------------------------------------------------------------------
    def shard_paths(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        for info in infos:  # a kill between write and move leaves a .tmp: nothing read it, so drop it
            if info.path.endswith(".parquet.tmp"):
                self.fs.delete_file(info.path)
        return sorted(i.path for i in infos if i.path.endswith(".parquet"))

    def scan(self, columns: tuple[str, ...] = ("id", "kind", "language", "query", "positive")):
        """Yield the written rows (only ``columns``), shard by shard."""
        for path in self.shard_paths():
            yield from pq.read_table(path, columns=list(columns), filesystem=self.fs).to_pylist()

    def write_shard(self, rows: list[dict]) -> str:
        table = pa.Table.from_pylist([{k: r[k] for k in COLUMNS} for r in rows], schema=SCHEMA)
        name = f"part-{self.run_tag}-{self.shard_index:05d}.parquet"
        self.shard_index += 1
        final = f"{self.path}/{name}"
        pq.write_table(table, final + ".tmp", filesystem=self.fs)
        self.fs.move(final + ".tmp", final)
        return name

    # ---- brainstorm and manifest -----------------------------------------------------------------------------
    def _json(self, name: str) -> Any:
        uri = storage.join(self.out_dir, name)
        return storage.read_json(uri) if storage.exists(uri) else None

    def load_brainstorm(self) -> dict[str, dict]:
        return self._json("brainstorm.json") or {}

    def save_brainstorm(self, state: dict[str, dict]) -> None:
        storage.write_json(storage.join(self.out_dir, "brainstorm.json"), state)

    def load_manifest(self) -> dict:
        return self._json(MANIFEST_FILE) or {}

    def save_manifest(self, manifest: dict) -> None:
        storage.write_json(storage.join(self.out_dir, MANIFEST_FILE), manifest)


class Tally:
    """Counts of what is on disk (by kind and language) and of this run's traffic."""

    def __init__(self):
        self.by_kind: Counter = Counter()
        self.by_language: Counter = Counter()
        self.drops: Counter = Counter()
        self.brainstorm_drops: Counter = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.written = 0
        self.requests = 0

    def add_row(self, row: dict) -> None:
        self.by_kind[row["kind"]] += 1
        self.by_language[row["language"]] += 1

    def add_tokens(self, row: dict) -> None:
        self.prompt_tokens += token_count(row.get("prompt_tokens")) or 0
        self.completion_tokens += token_count(row.get("completion_tokens")) or 0
