"""The run directory: one place (a local path or a cloud URI such as s3:// or gs://) for every stage's outputs.

Layout under a run directory:
    synthetic/   Parquet shards and manifest.json from `generate`
    train/       metrics.jsonl, loss curve, Ray Train checkpoints
    embedder/    the trained embedder directory (ray_e5.json + adapter/)
    eval/        per-task results, report.md, report.json, scores.png
Paths go through pyarrow's filesystems, so the same code writes locally and to object stores.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or a URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_text(uri: str, text: str) -> None:
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as src:
        return src.read().decode()


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def local_copy(uri: str) -> str:
    """A local directory for ``uri``: a plain path as it is; a URI (s3://, gs://, file://, ...) copied into the
    ray-e5 cache, so that a model saved to a run directory on object storage loads on any node.

    The cache is keyed by the URI and its listing (paths, sizes, modification times), so a directory rewritten in
    place (a retrained embedder) is fetched again, and an unchanged one only once. The copy is written beside its
    final place and renamed when complete, so a copy cut off half-way is redone.
    """
    if "://" not in uri:
        return uri
    import hashlib
    import shutil
    from pathlib import Path

    from ray_e5.model.sources import cache_root

    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri!r} is not a directory; accepted: a local path, a packaged name or the URI "
                                "of a model directory (s3://, gs://, file://, ...)")
    listing = sorted((info.path[len(path):], info.size, str(info.mtime))
                     for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if info.is_file)
    key = hashlib.sha256(json.dumps([uri.rstrip("/"), listing]).encode()).hexdigest()[:20]
    target = cache_root() / "remote" / key
    if target.is_dir():
        return str(target)
    partial = Path(f"{target}.partial-{os.getpid()}")  # per process: replicas on one node may copy at once
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    try:
        partial.rename(target)
    except OSError:  # another process finished first: its copy is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)
