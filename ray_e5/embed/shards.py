"""The blocks' files in ``output``: reading a block's rows (rejects apart), writing a shard whole, listing the
shards done, the manifest a rerun must match. Shared by both engines (:mod:`ray_e5.embed.run`, the Embedder's
actors; :mod:`ray_e5.embed.vllm`), so that ``output``'s layout and a rerun's skipping do not depend on the engine.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from ray_e5 import storage as runs
from ray_e5.embed.config import EmbedSettings
from ray_e5.embed.units import Block, MissingColumnError, jsonl_lines, jsonl_records, parquet_rows
from ray_e5.settings import ConfigError

MANIFEST = "_embed.json"
SUMMARY = "_summary.json"
REJECTS = "_rejects"
SHARD_PREFIX = "part-"
#: the manifest's keys a rerun must match: shards of another model (or columns, dimensions...) must not be mixed
SAME_RUN_KEYS = ("model", "engine", "text_column", "id_column", "dimensions", "instruction", "pooling")
META_MODEL, META_DIMENSION = b"ray_e5.model", b"ray_e5.dimension"


# ---- reading a block ---------------------------------------------------------------------------------------------
def block_rows(block: Block, text_column: str, id_column: str) -> tuple[list[str], list[str], list[dict]]:
    """(ids, texts, rejects) of one block. A row is rejected, never fatal, when its id is missing or null, its text
    is missing, null or not a string, or (JSONL) its line is not a JSON object."""
    ids: list[str] = []
    texts: list[str] = []
    rejects: list[dict] = []

    def take(row: int, ident: Any, text: Any, present: bool = True) -> None:
        reason = None
        if not present:
            reason = "not a JSON object"
        elif ident is None:
            reason = f"missing or null id ({id_column})"
        elif text is None:
            reason = f"missing or null text ({text_column})"
        elif not isinstance(text, str):
            reason = f"text ({text_column}) is {type(text).__name__}, not a string"
        if reason:
            rejects.append({"file": block.uri, "row": row, "id": None if ident is None else str(ident),
                            "reason": reason})
        else:
            ids.append(str(ident))
            texts.append(text)

    if block.format == "parquet":
        columns = list(dict.fromkeys([id_column, text_column]))
        table = parquet_rows(block, columns)
        for i, (ident, text) in enumerate(zip(table.column(id_column).to_pylist(),
                                              table.column(text_column).to_pylist())):
            take(block.start + i, ident, text)
    else:
        for i, record in enumerate(jsonl_records(jsonl_lines(block))):
            if record is None:
                take(i, None, None, present=False)
            else:
                take(i, record.get(id_column), record.get(text_column))
    return ids, texts, rejects


def check_columns(block: Block, text_column: str, id_column: str) -> None:
    """Raise :class:`MissingColumnError` (naming the columns found) when the first block lacks either column: a
    wrong ``--text-column`` must stop the job before any actor loads a model, not reject every row."""
    import pyarrow.parquet as pq

    wanted = list(dict.fromkeys([id_column, text_column]))
    if block.format == "parquet":
        fs, path = runs.resolve(block.uri)
        found = pq.ParquetFile(path, filesystem=fs).schema_arrow.names
    else:
        records = [r for r in jsonl_records(jsonl_lines(block)[:100]) if r is not None]
        if not records:
            return
        found = list(dict.fromkeys(k for r in records for k in r))
    missing = [c for c in wanted if c not in found]
    if missing:
        raise MissingColumnError(block.uri, missing, list(found))


# ---- writing -------------------------------------------------------------------------------------------------
def write_whole(uri: str, table: pa.Table) -> None:
    """Write a Parquet file so that it is either whole or absent: serialised in memory, then one PUT on an object
    store, or a temporary name renamed into place on a local disk (a process killed mid-write leaves a dot-file)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue()
    fs, path = runs.resolve(uri)
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    if runs.is_local(uri):
        tmp = f"{parent}/.{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as out:
            out.write(data.to_pybytes())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def done_shards(output: str) -> set[str]:
    """Names (without .parquet) of the shards already in ``output``: one listing, no file opened."""
    import pyarrow.fs as pafs

    fs, path = runs.resolve(output)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return set()
    return {i.base_name[:-len(".parquet")] for i in fs.get_file_info(pafs.FileSelector(path))
            if i.is_file and i.base_name.startswith(SHARD_PREFIX) and i.base_name.endswith(".parquet")}


def shard_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    fs, path = runs.resolve(uri)
    return pq.ParquetFile(path, filesystem=fs).metadata.num_rows


def check_manifest(output: str, manifest: dict) -> None:
    """Write ``_embed.json`` on a first run; on a rerun, refuse settings that would mix vectors of another kind."""
    uri = runs.join(output, MANIFEST)
    if runs.exists(uri):
        before = runs.read_json(uri)
        changed = [k for k in SAME_RUN_KEYS if before.get(k) != manifest.get(k)]
        if changed:
            diff = "; ".join(f"{k}: {before.get(k)!r} there, {manifest.get(k)!r} now" for k in changed)
            raise ConfigError(f"embed.output: {output!r} already holds embeddings made with other settings ({diff}). "
                              "Rerun with the same settings to resume, or write to another output")
    else:
        runs.write_json(uri, manifest)


# ---- the actor -------------------------------------------------------------------------------------------------
def truncate(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: the first ``dimensions`` coordinates, L2-normalised again (the prefix of a unit vector is not)."""
    if dimensions is None:
        return vectors
    if dimensions > vectors.shape[1]:
        raise ValueError(f"embed.dimensions={dimensions} is above the model's dimension {vectors.shape[1]}")
    cut = vectors[:, :dimensions]
    return (cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def max_actors(settings: EmbedSettings, blocks: int) -> int:
    """The pool's upper bound: ``max_actors``, else as many actors as the cluster's CPUs (GPUs) hold; at most one per
    block left to do."""
    import ray

    if settings.max_actors:
        n = settings.max_actors
    else:
        resources = ray.cluster_resources()
        n = int(resources.get("GPU", 0) // settings.num_gpus) if settings.num_gpus > 0 else \
            int(resources.get("CPU", 1) // settings.cpus_per_actor)
    return max(1, min(n, blocks))
