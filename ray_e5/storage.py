"""Storage: files over pyarrow filesystems for run directories and inputs, a local path or a cloud URI (s3://,
gs://) read and written by the same code. What lives where under a run directory is :mod:`ray_e5.rundir`'s
concern (hence two names: storage moves bytes, the run directory names them).

Inputs are named relative to the config's ``data_dir`` (:func:`data_uri`); a local path is made absolute on the
driver, a URI is kept as it is. Object stores take their endpoint and credentials from the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``; pyarrow's S3 filesystem
reads them itself, ``AWS_ENDPOINT_URL`` included), so no config holds a secret. :func:`check_access` is the
preflight every stage runs before any work: an unreachable store, a missing bucket, a refused credential or a
missing input stops the stage with a :class:`StorageError` naming the URI and what failed.
"""

from __future__ import annotations

import json
import hashlib
import os
from typing import Any

import pyarrow.fs as pafs

from ray_e5.digest import digest
from ray_e5.settings import ConfigError


class StorageError(ConfigError):
    """A run directory or input that cannot be used (unreachable store, missing bucket or file, refused
    credential); the message names the URI and what failed. Raised before a stage does any work."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or a URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(uri: str) -> str:
    """A URI as it is; a local path made absolute (against the driver's current directory)."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def is_relative(path: str) -> bool:
    """A path taken under ``data_dir`` (neither a URI nor absolute)."""
    return "://" not in path and not os.path.isabs(os.path.expanduser(path))


def data_uri(data_dir: str, path: str) -> str:
    """Where an input named in a config lives: a URI or an absolute path as it is, a relative path under
    ``data_dir`` (itself a local path or a URI)."""
    if "://" in path or os.path.isabs(os.path.expanduser(path)):
        return absolute(path)
    return join(absolute(data_dir), path)


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:400]


def check_access(uri: str, what: str, must_exist: bool = True) -> pafs.FileInfo | None:
    """Preflight for ``uri`` (``what`` says which setting named it): the store answers, the bucket exists, the
    credentials are accepted and, with ``must_exist``, the file or folder is there. Raises :class:`StorageError`
    naming the URI and what failed; returns the file info (None for a writable place that does not exist yet)."""
    try:
        fs, path = resolve(uri)
    except Exception as err:  # noqa: BLE001 - a malformed URI, an unknown scheme, a filesystem not built in
        raise StorageError(f"{what}: {uri!r}: cannot open this location: {_first_line(err)}") from None
    if _scheme(uri) in ("s3", "gs", "gcs"):
        bucket = path.split("/", 1)[0]
        endpoint = os.environ.get("AWS_ENDPOINT_URL") if _scheme(uri) == "s3" else None
        where = f" at {endpoint}" if endpoint else ""
        try:
            info = fs.get_file_info(bucket)
        except OSError as err:
            text = _first_line(err)
            if any(k in text for k in ("NETWORK_CONNECTION", "Could not connect", "resolve host", "Timeout", "timed out")):
                why = f"the object store{where} cannot be reached"
            elif any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                         "403", "401", "credentials", "INVALID_ACCESS_KEY")):
                why = (f"the object store{where} refused the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                       "or the node's role)")
            else:
                why = f"the object store{where} failed"
            raise StorageError(f"{what}: {uri!r}: {why}: {text}") from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{what}: {uri!r}: bucket {bucket!r} does not exist{where} (create it first; "
                               "ray-e5 never creates buckets)")
    if not must_exist:
        return None
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise StorageError(f"{what}: {uri!r}: cannot be read: {_first_line(err)}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what}: {uri!r}: no such file or folder")
    return info


def listing(uri: str) -> list[tuple[str, int, str]] | None:
    """(relative path, size, modification time) of every file under ``uri`` (a folder, local or remote), sorted;
    None when ``uri`` is not a folder. What a cache keys on: a folder rewritten in place lists differently."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    path = path.rstrip("/")
    return sorted((info.path[len(path):], info.size, str(info.mtime))
                  for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if info.is_file)


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
    """Write a whole file. On a local disk it is written beside its place and renamed, so a process killed mid-write
    (a driver stopped during a run) leaves the previous version, never a truncated one; an object store's PUT is
    already all or nothing."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as out:
            out.write(text.encode())
        os.replace(tmp, path)
        return
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


def _safe_relative(key: str, rel: str) -> str:
    """``rel`` (a path under a folder being copied) when it stays inside that folder; else a StorageError naming
    the object ``key``. An object store accepts any key, ``embedder/../../evil`` or ``/etc/x`` included, and a copy
    that joined such a key to a local folder would write outside it."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or not rel or any(p in ("..", ".", "") for p in parts) or ":" in parts[0]:
        raise StorageError(f"{key!r}: refused: this object key would be written outside the local copy's folder "
                           "(absolute, empty or '..'/'.' parts); accepted: plain relative keys such as "
                           "'adapter/adapter_model.safetensors'")
    return "/".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_partials(folder, prefix: str) -> None:
    """Remove ``<prefix><pid>`` folders left by copies whose process died (killed mid-copy); live ones stay."""
    import shutil

    if not folder.is_dir():
        return
    for leftover in folder.glob(f"{prefix}*"):
        pid = leftover.name[len(prefix):]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


SMALL_FILE_BYTES = 64 * 1024  # files a cached copy's key reads whole (manifests, configs)


def local_copy(uri: str) -> str:
    """A local directory for ``uri``: a plain path as it is; a URI (s3://, gs://, file://, ...) copied into the
    ray-e5 cache, so that a model saved to a run directory on object storage loads on any node.

    The cache is keyed by the URI, its listing (paths, sizes, modification times) and its small files' contents,
    so a directory rewritten in
    place (a retrained embedder) is fetched again, and an unchanged one only once. The copy is written beside its
    final place and renamed when complete, so a copy cut off half-way is redone, and its leftovers are removed by
    the next call. Every key must stay inside the copy's folder (:func:`_safe_relative`): one that would not is
    refused before anything is copied.
    """
    if "://" not in uri:
        return uri
    import shutil
    from pathlib import Path

    from ray_e5.model.references import cache_root

    fs, path = resolve(uri)
    files = listing(uri)
    if files is None:
        raise FileNotFoundError(f"{uri!r} is not a directory; accepted: a local path, a packaged name or the URI "
                                "of a model directory (s3://, gs://, file://, ...)")
    root = path.rstrip("/")
    relative = [_safe_relative(f"{root}{rel}", rel.lstrip("/")) for rel, _, _ in files]
    # Sizes and modification times (one-second resolution on S3) cannot tell two saves of the same shapes within
    # a second apart; the small files (an embedder's manifest carries a new revision at every save) can.
    small = []
    for (rel, size, _), name in zip(files, relative):
        if size is not None and size <= SMALL_FILE_BYTES:
            with fs.open_input_stream(f"{root}/{name}") as src:
                small.append(hashlib.sha256(src.read()).hexdigest())
    key = digest([uri.rstrip("/"), files, small], 20)
    target = cache_root() / "remote" / key
    if target.is_dir():
        return str(target)
    prefix = f"{key}.partial-"
    _remove_partials(target.parent, prefix)
    partial = target.parent / f"{prefix}{os.getpid()}"  # per process: replicas on one node may copy at once
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for rel in relative:
        dest = partial / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root}/{rel}") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    try:
        partial.rename(target)
    except OSError:  # another process finished first: its copy is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def publish_dir(src_fs: pafs.FileSystem, src: str, dst_uri: str, manifest: str) -> None:
    """Replace the folder ``dst_uri`` with the files under ``src`` so that a reader sees the old folder whole, the
    new one whole, or none, never a mix (a training killed mid-copy must not leave a half embedder to be served).

    ``manifest`` (a file directly under ``src``, such as ``ray_e5.json``) is what makes the folder count, and it
    lists what the folder needs. Locally the files are copied into a hidden sibling that is renamed into place (the
    old folder renamed away first, then removed). An object store has no rename: the old manifest is deleted first
    (from then on readers find nothing), the old files next, then every new file, and the manifest LAST; readers
    read the manifest first. Leftovers of an interrupted local publish are removed by the next one.
    """
    import shutil
    import uuid

    src = src.rstrip("/")
    infos = [i for i in src_fs.get_file_info(pafs.FileSelector(src, recursive=True)) if i.is_file]
    rels = sorted(i.path[len(src):].lstrip("/") for i in infos)
    if manifest not in rels:
        raise FileNotFoundError(f"{src!r} holds no {manifest}: nothing to publish")
    fs, dst = resolve(dst_uri)
    dst = dst.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        parent, name = os.path.split(dst)
        os.makedirs(parent, exist_ok=True)
        for leftover in os.listdir(parent):  # a publish killed before its renames (one writer: the train lease)
            if leftover.startswith((f".{name}.publish-", f".{name}.old-")):
                shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging = os.path.join(parent, f".{name}.publish-{token}")
        pafs.copy_files(src, staging, source_filesystem=src_fs, destination_filesystem=fs)
        if os.path.exists(dst):
            old = os.path.join(parent, f".{name}.old-{token}")
            os.rename(dst, old)
            os.rename(staging, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dst)
        return
    if fs.get_file_info(f"{dst}/{manifest}").type != pafs.FileType.NotFound:
        fs.delete_file(f"{dst}/{manifest}")
    if fs.get_file_info(dst).type == pafs.FileType.Directory:
        fs.delete_dir_contents(dst)
    for rel in [r for r in rels if r != manifest] + [manifest]:
        with src_fs.open_input_stream(f"{src}/{rel}") as data, fs.open_output_stream(f"{dst}/{rel}") as out:
            while chunk := data.read(1 << 20):
                out.write(chunk)
