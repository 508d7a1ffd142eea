"""One writer per stage and run directory: a lease in ``<run_dir>/leases/<stage>.json``.

Two drivers on one run directory (Ctrl-C on `ray job submit` stops the tailing, not the job; the user submits again)
would both send the same pending LLM requests (paid twice), each keep its own budget ledger, delete each other's
temporary shards and resume one checkpoint path. A stage entry point therefore holds a lease while it runs::

    with hold_lease(config.run_dir, "generate"):
        ...

The lease file names its holder (the Ray job submission id when the driver runs as a job, the host and pid, a random
token), when it was taken, the last heartbeat and the expiry. A heartbeat thread renews it every third of its time
to live (``RAY_E5_LEASE_TTL_S``, default 60 s); it is released when the stage ends, Ctrl-C included. A second driver
is refused with :class:`LeaseHeldError` naming the holder; a lease whose heartbeat expired (a driver killed with
SIGKILL, a lost node) is taken over, and so at once is one whose holder ran on this host and is gone.

Every change of the file is a compare-and-swap, so two drivers racing for a free or stale lease cannot both win:
    local disks   the read-compare-write runs under ``flock`` on ``<stage>.json.lock`` (the kernel drops that lock
                  when its process dies, so a killed driver never leaves it held) and writes by atomic rename;
    s3://         ``PutObject`` with ``If-None-Match: *`` to create and ``If-Match: <etag>`` to renew or take over
                  (boto3; S3 has honoured both since 2024);
    gs://         generation preconditions (``if_generation_match``) through google-cloud-storage.
No well-kept library offers conditional-write leases over these stores (pyarrow's filesystems have no conditional
write at all), hence this small module. Expiry is judged by the clock of the driver reading the lease, so the time to
live must stay well above the clock skew between drivers' hosts.
"""

from __future__ import annotations

import _thread
import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from hashlib import sha256
from typing import Any, Iterator

from ray_e5.settings import ConfigError

TTL_ENV = "RAY_E5_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0
# `ray job submit` runs the entry point with this JSON set; its metadata holds the submission id (what `ray job stop`
# takes). Read from the environment, so the lease is taken before the driver joins Ray.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class LeaseError(ConfigError):
    """The stage cannot take or keep its lease (held by another driver, lost, or a store without conditional
    writes). Raised before any work, so nothing is lost."""


class LeaseHeldError(LeaseError):
    """Another live driver holds the stage's lease on this run directory."""


class LeaseLostError(LeaseError):
    """The lease was taken over while this driver ran (its heartbeats failed for a whole time to live)."""


class _Conflict(Exception):
    """A conditional write lost: the object changed (or appeared) since it was read."""


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _job_id() -> str | None:
    try:
        return json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def holder_identity() -> dict[str, Any]:
    job = _job_id()
    return {"job_id": job, "host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace()}


def _holder_dead(record: dict) -> bool:
    """The holder ran on this host (same hostname and pid namespace) and its process is gone: a driver killed here
    (SIGKILL, a closed terminal) need not be waited for until its lease expires."""
    from ray_e5.storage import _pid_alive

    h = record.get("holder", {})
    mine = holder_identity()
    return (h.get("host") == mine["host"] and h.get("pid_namespace") == mine["pid_namespace"]
            and isinstance(h.get("pid"), int) and h["pid"] != mine["pid"] and not _pid_alive(h["pid"]))


def describe_holder(record: dict) -> str:
    """``Ray job <id> (host h, pid p)`` or ``host h, pid p``."""
    h = record.get("holder", {})
    where = f"host {h.get('host')}, pid {h.get('pid')}"
    return f"Ray job {h['job_id']} ({where})" if h.get("job_id") else where


# ---- conditional stores: read -> (record, version); create / replace fail with _Conflict ---------------------------
class _LocalStore:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _read(self) -> tuple[dict | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return json.loads(data), sha256(data).hexdigest()

    def _write(self, data: bytes) -> str:
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return sha256(data).hexdigest()

    def read(self) -> tuple[dict | None, str | None]:
        with self._locked():
            return self._read()

    def create(self, data: bytes) -> str:
        with self._locked():
            if os.path.exists(self.path):
                raise _Conflict
            return self._write(data)

    def replace(self, data: bytes, version: str) -> str:
        with self._locked():
            if self._read()[1] != version:
                raise _Conflict
            return self._write(data)


class _S3Store:
    def __init__(self, bucket: str, key: str):
        try:
            import boto3
        except ImportError:
            raise LeaseError("an s3:// run directory needs boto3 for its stage lease (conditional writes): "
                             "pip install boto3") from None
        self.bucket, self.key = bucket, key
        # boto3 reads AWS_ENDPOINT_URL and the credentials itself, as pyarrow does; AWS_REGION is our documented name
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.client = boto3.client("s3", region_name=region)

    def _conflict(self, err: Exception) -> bool:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def read(self) -> tuple[dict | None, str | None]:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return json.loads(got["Body"].read()), got["ETag"]

    def _put(self, data: bytes, **condition: str) -> str:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except ClientError as err:
            if self._conflict(err):
                raise _Conflict from None
            raise

    def create(self, data: bytes) -> str:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str:
        return self._put(data, IfMatch=version)


class _GCSStore:
    def __init__(self, bucket: str, key: str):
        try:
            from google.cloud import storage
        except ImportError:
            raise LeaseError("a gs:// run directory needs google-cloud-storage for its stage lease (generation "
                             "preconditions): pip install google-cloud-storage") from None
        self.blob = storage.Client().bucket(bucket).blob(key)

    def read(self) -> tuple[dict | None, str | None]:
        from google.api_core.exceptions import NotFound

        try:
            data = self.blob.download_as_bytes()
        except NotFound:
            return None, None
        return json.loads(data), str(self.blob.generation)

    def _put(self, data: bytes, generation: int) -> str:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.blob.upload_from_string(data, content_type="application/json", if_generation_match=generation)
        except PreconditionFailed:
            raise _Conflict from None
        return str(self.blob.generation)

    def create(self, data: bytes) -> str:
        return self._put(data, 0)  # generation 0: only if no live object exists

    def replace(self, data: bytes, version: str) -> str:
        return self._put(data, int(version))


def lease_uri(run_dir: str, stage: str) -> str:
    from ray_e5 import storage
    from ray_e5.rundir import RunDir

    return RunDir(storage.absolute(run_dir)).lease(stage)


def _store(uri: str):
    if "://" not in uri or uri.startswith("file://"):
        return _LocalStore(uri[len("file://"):] if uri.startswith("file://") else uri)
    scheme, rest = uri.split("://", 1)
    bucket, _, key = rest.partition("/")
    if scheme == "s3":
        return _S3Store(bucket, key)
    if scheme in ("gs", "gcs"):
        return _GCSStore(bucket, key)
    raise LeaseError(f"run_dir: {uri!r}: no stage lease on {scheme}:// (it needs conditional writes); accepted: a "
                     "local path, file://, s3:// or gs://")


# ---- the lease ------------------------------------------------------------------------------------------------------
class Lease:
    """The lease of one stage on one run directory, held by this process between :meth:`acquire` and
    :meth:`release`."""

    def __init__(self, run_dir: str, stage: str, ttl_s: float | None = None):
        self.stage, self.uri = stage, lease_uri(run_dir, stage)
        self.ttl_s = float(ttl_s if ttl_s is not None else os.environ.get(TTL_ENV, DEFAULT_TTL_S))
        if not self.ttl_s > 0:
            raise LeaseError(f"{TTL_ENV}: {self.ttl_s!r}: the lease's time to live must be a positive number of "
                             "seconds")
        if "://" in self.uri and not self.uri.startswith("file://"):
            from ray_e5 import storage

            storage.check_access(run_dir, "run_dir", must_exist=False)  # a missing bucket or refused key, named
        self.store = _store(self.uri)
        self.token = secrets.token_hex(8)
        self.version: str | None = None
        self.record: dict[str, Any] = {}
        self.lost: str | None = None

    def _new_record(self, now: float, taken_at: float | None = None) -> dict[str, Any]:
        return {"stage": self.stage, "token": self.token, "holder": holder_identity(),
                "taken_at": taken_at or now, "heartbeat_at": now, "expires_at": now + self.ttl_s,
                "ttl_s": self.ttl_s, "released_at": None}

    def _refusal(self, record: dict) -> LeaseHeldError:
        job = record.get("holder", {}).get("job_id")
        stop = f" or stop it (`ray job stop {job}`)" if job else " or stop that process"
        return LeaseHeldError(
            f"{self.stage}: run directory in use: {describe_holder(record)} holds the {self.stage} lease since "
            f"{_when(record['taken_at'])} (last heartbeat {_when(record['heartbeat_at'])}; it expires at "
            f"{_when(record['expires_at'])} unless renewed). Wait for that driver to finish{stop}: a driver that "
            f"died leaves a lease that is taken over once it has expired. Lease: {self.uri}")

    def acquire(self) -> "Lease":
        for _ in range(3):  # a lost race re-reads and judges the winner's record
            current, version = self.store.read()
            now = time.time()
            record = self._new_record(now)
            data = json.dumps(record, indent=2).encode()
            try:
                if current is None:
                    self.version = self.store.create(data)
                elif current.get("released_at") is None and current.get("expires_at", 0) > now \
                        and not _holder_dead(current):
                    raise self._refusal(current)
                else:
                    self.version = self.store.replace(data, version)
                    if current.get("released_at") is None:
                        why = ("its process is gone" if current.get("expires_at", 0) > now else
                               f"its last heartbeat was at {_when(current['heartbeat_at'])} and it expired at "
                               f"{_when(current['expires_at'])}")
                        print(f"[ray-e5 {self.stage}] took over the {self.stage} lease of {describe_holder(current)}: "
                              f"{why}", flush=True)
            except _Conflict:
                continue
            self.record = record
            return self
        current, _ = self.store.read()
        raise self._refusal(current) if current else LeaseError(f"{self.stage}: could not take the lease {self.uri}")

    def renew(self) -> None:
        """Move the expiry on; a lease taken over meanwhile sets :attr:`lost`."""
        now = time.time()
        record = {**self.record, "heartbeat_at": now, "expires_at": now + self.ttl_s}
        try:
            self.version = self.store.replace(json.dumps(record, indent=2).encode(), self.version)
        except _Conflict:
            current, _ = self.store.read()
            who = describe_holder(current) if current else "nobody (the lease file was removed)"
            self.lost = (f"{self.stage}: this driver lost its lease on {self.uri} (its heartbeats failed until it "
                         f"expired) and {who} holds it now; stopped so that two drivers never write one run")
            return
        self.record = record

    def release(self) -> None:
        if self.lost or self.version is None:
            return
        record = {**self.record, "released_at": time.time()}
        try:
            self.version = self.store.replace(json.dumps(record, indent=2).encode(), self.version)
        except _Conflict:
            pass  # taken over already: nothing of ours to release


@contextmanager
def hold_lease(run_dir: str, stage: str, ttl_s: float | None = None) -> Iterator[Lease]:
    """Hold ``stage``'s lease on ``run_dir`` for the block: refused (:class:`LeaseHeldError`) while another live
    driver holds it; renewed by a daemon thread; released at the end, Ctrl-C included. A lease lost meanwhile
    interrupts the block and raises :class:`LeaseLostError`."""
    lease = Lease(run_dir, stage, ttl_s).acquire()
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()

    def beat() -> None:
        while not stop.wait(lease.ttl_s / 3):
            try:
                lease.renew()
            except Exception as err:  # noqa: BLE001 - a store that does not answer: try again next beat
                if time.time() < lease.record["expires_at"]:
                    print(f"[ray-e5 {stage}] lease heartbeat failed ({type(err).__name__}: {err}); retrying",
                          flush=True)
                    continue
                lease.lost = (f"{stage}: the lease on {lease.uri} expired: its heartbeats failed "
                              f"({type(err).__name__}: {err}); stopped so that two drivers never write one run")
            if lease.lost:
                print(f"[ray-e5 {stage}] {lease.lost}", flush=True)
                if main:
                    _thread.interrupt_main()
                return

    thread = threading.Thread(target=beat, name=f"ray-e5-lease-{stage}", daemon=True)
    thread.start()
    try:
        yield lease
    except KeyboardInterrupt:
        if lease.lost:
            raise LeaseLostError(lease.lost) from None
        raise
    finally:
        stop.set()
        thread.join(timeout=5)
        lease.release()
