"""Training sources: where rows come from (labeled JSONL, Parquet shards, the synthetic stage's output), and
their reading into rows of the contract.

JSONL is read line by line and parsed per line, so a malformed line or a column whose type changes between lines
becomes one counted problem rather than a failed read (Arrow's JSON reader rejects both). Paths go through
pyarrow filesystems: local, s3:// and gs:// alike.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_e5 import storage
from ray_e5.data.schema import FILTERED_PREFIX, RowDefaults, normalize_record, rows_table
from ray_e5.rundir import CONSISTENCY_FILE, RunDir

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
INVALID_JSON = object()


class SourceError(ValueError):
    """A training source that cannot be read at all (missing path, no data files); names the source."""


@dataclass(frozen=True)
class Source:
    """A resolved source: its files, their format, the row defaults and the sampling weight."""

    name: str
    format: str  # "jsonl" or "parquet"
    files: tuple[str, ...]  # paths inside ``filesystem``
    filesystem: pafs.FileSystem
    defaults: RowDefaults
    weight: float = 1.0
    excluded: tuple[tuple[str, str], ...] = ()  # (row id, reason): rows read but filtered (consistency)


def _files(fs: pafs.FileSystem, path: str) -> tuple[str, list[str]]:
    """The format and data files at ``path``: a file, or a folder (train.jsonl first, then *.jsonl, *.parquet)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        suffix = PurePosixPath(path).suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return "jsonl", [path]
        if suffix in PARQUET_SUFFIXES:
            return "parquet", [path]
        raise SourceError(f"{path}: unsupported file type {suffix!r}; accepted: .jsonl, .json (JSON lines), .parquet")
    if info.type != pafs.FileType.Directory:
        raise SourceError(f"{path}: no such file or folder")
    if fs.get_file_info(f"{path}/train.jsonl").type == pafs.FileType.File:
        return "jsonl", [f"{path}/train.jsonl"]
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = sorted(i.path for i in listing if i.type == pafs.FileType.File and not PurePosixPath(i.path).name.startswith((".", "_")))
    for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        found = [n for n in names if PurePosixPath(n).suffix.lower() in suffixes and PurePosixPath(n).name != "task.json"]
        if found:
            return fmt, found
    raise SourceError(f"{path}: folder holds no train.jsonl, *.jsonl or *.parquet files")


def _task_hint(fs: pafs.FileSystem, folder: str) -> str:
    """The instruction a dataset folder suggests (task.json ``instruction_hint``), or ""."""
    try:
        with fs.open_input_stream(f"{folder}/task.json") as src:
            meta = json.loads(src.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return ""
    hint = meta.get("instruction_hint") if isinstance(meta, dict) else None
    return hint if isinstance(hint, str) else ""


def labeled_source(path: str, *, name: str | None = None, weight: float = 1.0, task: str | None = None,
                   kind: str = "labeled", language: str = "en", min_score: float | None = None,
                   graded: bool = False) -> Source:
    """Resolve a labeled source (file or folder, local or s3://, gs://)."""
    fs, resolved = storage.resolve(path)
    fmt, files = _files(fs, resolved)
    is_dir = fs.get_file_info(resolved).type == pafs.FileType.Directory
    folder = resolved if is_dir else str(PurePosixPath(resolved).parent)
    if task is None:
        task = _task_hint(fs, folder)
    if name is None:
        stem = PurePosixPath(resolved).stem
        name = PurePosixPath(folder).name if is_dir or stem in ("train", "data") else stem
    return Source(name, fmt, tuple(files), fs, RowDefaults(name, task, kind, language, min_score, graded), weight)


def synthetic_source(run_dir: str, weight: float = 1.0) -> Source | None:
    """The synthetic stage's Parquet shards under ``<run_dir>/synthetic``, or None when there are none."""
    uri = RunDir(run_dir).synthetic
    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in listing if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        return None
    excluded = tuple(sorted(consistency_dropped(uri).items()))
    return Source("synthetic", "parquet", tuple(files), fs, RowDefaults("synthetic", "", "synthetic", "en"), weight,
                  excluded)


def consistency_dropped(synthetic_dir: str) -> dict[str, str]:
    """The synthetic row ids the generate stage's consistency pass dropped, with reasons (empty when none ran;
    see :mod:`ray_e5.generate.consistency`)."""
    uri = storage.join(synthetic_dir, CONSISTENCY_FILE)
    if not storage.exists(uri):
        return {}
    data = storage.read_json(uri)
    dropped = data.get("dropped") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in dropped.items()} if isinstance(dropped, dict) else {}


def source_from_settings(settings, data_dir: str | None = None) -> Source:
    """A :class:`Source` from a ``train.sources`` entry (``ray_e5.train.config.SourceSettings``); a relative
    ``path`` is taken under ``data_dir`` (the config's top-level ``data_dir``), a URI or absolute path as it is.
    The location is checked first (store reachable, bucket present, credentials accepted, path present). An entry
    with ``hf`` is read from the Hub (:mod:`ray_e5.data.hub`) when it has no ``path`` or its path is absent."""
    path = None
    if settings.path:
        path = storage.data_uri(data_dir, settings.path) if data_dir is not None else storage.absolute(settings.path)
    if settings.hf and (path is None or not _present(path)):
        return _hub_source(settings)
    try:
        storage.check_access(path, "data")
    except storage.StorageError as err:
        raise SourceError(str(err).removeprefix("data: ")
                          + (f" (data_dir {data_dir!r})" if data_dir is not None and storage.is_relative(settings.path) else "")) from None
    return labeled_source(path, name=settings.name, weight=settings.weight, task=settings.task,
                          kind=settings.kind, language=settings.language, min_score=settings.min_score,
                          graded=settings.loss == "cosent")


def _present(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except Exception:  # noqa: BLE001 - an unreachable mirror is an absent one: the Hub serves the entry
        return False


def _hub_source(settings) -> Source:
    """A source read from a Hugging Face dataset: its rows, columns mapped, as a local Parquet file. Named as the
    mirror path would name it (so a run names its sources the same either way), else after the dataset."""
    from ray_e5.settings import ConfigError
    from ray_e5.data.hub import hf_rows_file

    name = settings.name
    if name is None and settings.path:
        stem = PurePosixPath(settings.path.rstrip("/"))
        name = stem.parent.name if stem.suffix and stem.stem in ("train", "data") else stem.stem or stem.name
    if name is None:
        name = settings.hf.rstrip("/").rsplit("/", 1)[-1] + (f"-{settings.config}" if settings.config else "")
    try:
        parquet = hf_rows_file(settings, f"hf dataset {settings.hf}")
    except ConfigError as err:
        raise SourceError(str(err)) from None
    return labeled_source(parquet, name=name, weight=settings.weight, task=settings.task or "",
                          kind=settings.kind, language=settings.language, min_score=settings.min_score,
                          graded=settings.loss == "cosent")


def iter_records(source: Source, batch_rows: int = 8192) -> Iterator[list]:
    """Raw records of a source in batches; a JSON line that does not parse yields the marker ``INVALID_JSON``."""
    for path in source.files:
        if source.format == "jsonl":
            batch: list = []
            with source.filesystem.open_input_stream(path) as src:
                for line in io.TextIOWrapper(src, encoding="utf-8", errors="replace"):
                    if not line.strip():
                        continue
                    try:
                        batch.append(json.loads(line))
                    except ValueError:
                        batch.append(INVALID_JSON)
                    if len(batch) >= batch_rows:
                        yield batch
                        batch = []
            if batch:
                yield batch
        else:
            with source.filesystem.open_input_file(path) as src:
                for record_batch in pq.ParquetFile(src).iter_batches(batch_size=batch_rows):
                    yield record_batch.to_pylist()


def misleading_labels(rows: list[dict], seed: int = 0) -> None:
    """Give each labeled-text row (kind long-short, no negative) a misleading label as its hard negative, as the
    paper's classification examples have: another label of the same source, preferably one sharing a word with the
    true one (``card arrival`` against ``card delivery estimate``), else any other. Seeded by the row's text."""
    import random

    labels = sorted({r["positive"] for r in rows if r["kind"] == "long-short" and not r["problem"] and not r["negative"]})
    if len(labels) < 2:
        return
    sharing = {label: [o for o in labels if o != label and set(o.split()) & set(label.split())] for label in labels}
    for row in rows:
        if row["kind"] != "long-short" or row["problem"] or row["negative"] or row["positive"] not in sharing:
            continue
        rng = random.Random(f"{seed}:{row['query']}")
        pool = sharing[row["positive"]] or [o for o in labels if o != row["positive"]]
        row["negative"] = rng.choice(pool)


def read_rows(source: Source) -> pa.Table:
    """All rows of a source, normalised (ROW_COLUMNS; ``problem`` non-empty on rows that cannot train); labeled
    texts get their misleading labels (:func:`misleading_labels`)."""
    rows = []
    excluded = dict(source.excluded)
    for batch in iter_records(source):
        for record in batch:
            if record is INVALID_JSON:
                row = normalize_record({}, source.defaults)
                row["problem"] = "not valid JSON"
            else:
                row = normalize_record(record, source.defaults)
                reason = excluded.get(record.get("id")) if excluded and isinstance(record, dict) else None
                if reason and not row["problem"]:
                    row["problem"] = f"{FILTERED_PREFIX}{reason}"
            rows.append(row)
    misleading_labels(rows)
    return rows_table(rows)
