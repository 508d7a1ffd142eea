"""A simulated multi-node Ray cluster on this machine, with an S3-compatible object store on loopback: the helpers
the cluster tests (``tests/test_cluster*.py``, ``test_autoscaling.py``, ``test_capacity.py``, ``test_lease.py``)
and the benchmark ``bench/cluster_smoke.py`` share.

- :class:`Moto` / :func:`start_moto`: moto's standalone S3 server on a free loopback port (``moto.env`` holds the
  ``AWS_*`` variables that point every process at it); :func:`upload`, :func:`upload_smoke_data` and
  :func:`bucket_files` put files in and list what a job wrote.
- :class:`Cluster`: a head and worker nodes started with ``ray start``, each on ports and under a temp dir of its
  own, so that :meth:`Cluster.stop` ends exactly its own processes (``ray stop`` would end every Ray on the
  machine) and :meth:`Cluster.kill_node` crashes one node as a lost machine does.
- :func:`submit` (waits) and :func:`start_job` (in the background): ``ray job submit`` of a ``jobs/`` script with
  the checkout as working dir; :func:`smoke_args` builds ``jobs/pipeline.py``'s arguments for configs/smoke.yaml.
- :func:`alive_actors`, :func:`actor_nodes`: where actors ran, from Ray's state API.
- :func:`start_openai_server`: :mod:`ray_e5.testing.openai_server` in its own process, as generation backend;
  :func:`openai_check` asks a served embedder through the openai client.
- :func:`free_port`, :func:`wait_port`, :func:`kill_tree`: ports and process trees.

Jobs are submitted from the ray-e5 checkout (:data:`ROOT`: the one this module lies in, else the current directory
or one above it, as when the package is installed from a wheel and the tests run from the checkout).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from ray_e5.net import free_port

__all__ = ["ROOT", "SHARED_DATA", "SMOKE_DATA", "BIN", "Cluster", "Moto", "actor_nodes", "alive_actors",
           "bucket_files", "free_port", "kill_tree", "openai_check", "require_moto", "smoke_args", "start_job",
           "start_moto", "start_openai_server", "submit", "upload", "upload_smoke_data", "wait_port"]


def _checkout() -> Path:
    """The ray-e5 checkout whose ``jobs/`` and ``configs/`` a submitted job runs: this module's own (an editable
    install), else the current directory or the nearest directory above it that has them."""
    here = Path(__file__).resolve().parents[2]
    cwd = Path.cwd().resolve()
    for candidate in (here, cwd, *cwd.parents):
        if (candidate / "jobs" / "pipeline.py").is_file() and (candidate / "configs").is_dir():
            return candidate
    return here


ROOT = _checkout()
SHARED_DATA = Path(os.environ.get("RAY_E5_SHARED_DATA", ROOT / ".." / "shared" / "data")).resolve()
SMOKE_DATA = ["snli_triplets/train.jsonl", "stsbenchmark/task.json", "stsbenchmark/train.jsonl",
              "stsbenchmark/test.jsonl"]  # the labeled files configs/smoke.yaml names
BIN = Path(sys.executable).parent  # ray, moto_server: the console scripts of this Python's environment


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on 127.0.0.1:``port``; fail at once if ``proc`` (the process meant to
    listen) exits first, and after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def end_processes(procs: list, timeout: float = 8) -> None:
    """SIGTERM every psutil process in ``procs``, then SIGKILL those still alive ``timeout`` seconds later."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def kill_tree(pid: int) -> None:
    """End process ``pid`` and all its descendants: SIGTERM, then SIGKILL for those alive 5 s later."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    end_processes(parent.children(recursive=True) + [parent], timeout=5)


# ---- the object store ----------------------------------------------------------------------------------------
class Moto:
    """moto's standalone S3 server on a loopback port; ``env`` holds the AWS variables that point at it."""

    def __init__(self, log_dir: Path, port: int | None = None, auth: bool = False):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if auth:  # moto checks credentials from the first request on: any key it did not issue is refused
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.log = open(log_dir / f"moto-{self.port}.log", "wb")
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_port(self.port, 30, self.proc)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "ray-e5-test",
                    "AWS_SECRET_ACCESS_KEY": "ray-e5-test", "AWS_REGION": "us-east-1"}

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key=self.env["AWS_ACCESS_KEY_ID"],
                                 secret_key=self.env["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                                 allow_bucket_creation=True, allow_bucket_deletion=True)

    def create_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def stop(self) -> None:
        kill_tree(self.proc.pid)
        self.log.close()


def require_moto() -> None:
    """moto's server is a dev dependency: a cluster test without it fails (it never skips what it exists to show)."""
    if shutil.which("moto_server", path=str(BIN)) is None:
        raise RuntimeError(f"moto_server is not installed in {BIN}: pip install 'moto[server]' (in the dev extra)")


def start_moto(log_dir: Path, auth: bool = False) -> Moto:
    """moto's S3 server on a free port, logging under ``log_dir``; ``auth``: it refuses keys it did not issue."""
    return Moto(log_dir, auth=auth)


def upload(moto: Moto, local: Path, key: str) -> None:
    """Copy a local file to ``s3://<key>`` (key = bucket/path)."""
    fs = moto.filesystem()
    with open(local, "rb") as src, fs.open_output_stream(key) as out:
        shutil.copyfileobj(src, out, 1 << 20)


def upload_smoke_data(moto: Moto, bucket: str, prefix: str = "data") -> str:
    """The labeled files configs/smoke.yaml names, under ``s3://<bucket>/<prefix>``; returns that URI."""
    for rel in SMOKE_DATA:
        upload(moto, SHARED_DATA / rel, f"{bucket}/{prefix}/{rel}")
    return f"s3://{bucket}/{prefix}"


def bucket_files(moto: Moto, uri: str) -> dict[str, int]:
    """Relative path -> size of every object under ``uri`` (s3://bucket/prefix)."""
    import pyarrow.fs as pafs

    base = uri.removeprefix("s3://").rstrip("/")
    fs = moto.filesystem()
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return {}
    return {i.path[len(base) + 1:]: i.size for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if i.is_file}


# ---- the cluster ---------------------------------------------------------------------------------------------
class Cluster:
    """A head and ``workers`` worker nodes started with ``ray start`` on this machine, on ports of their own and
    under their own temp dir; :meth:`stop` ends exactly the processes they started (``ray stop`` would end every
    Ray on the machine)."""

    def __init__(self, workers: int, env: dict[str, str], temp_dir: Path, head_cpus: int = 1, worker_cpus: int = 2,
                 object_store_mb: int = 150, head_args: tuple[str, ...] = (), port: int | None = None):
        self.temp_dir = temp_dir
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        self.env.update(env)
        self.env.update({"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                         "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"})
        self.port = port or free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.logs = temp_dir / "start-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        store = str(object_store_mb * 1024 * 1024)
        try:
            self._start("head", ["--head", "--port", str(self.port), "--dashboard-port", str(self.dashboard_port),
                                 "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                                 "--ray-client-server-port", str(free_port()), "--temp-dir", str(temp_dir / "h"),
                                 "--num-cpus", str(int(head_cpus)), "--num-gpus", "0", "--object-store-memory", store,
                                 "--resources", json.dumps({"head": 1}), *head_args])
            for i in range(workers):
                self.add_worker(i, worker_cpus, store)
        except BaseException:
            self.stop()
            raise

    def _node_ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--disable-usage-stats"]

    def _start(self, name: str, args: list[str]) -> None:
        # Ray Serve's HAProxy ingress binds fixed stats and metrics ports on every node; nodes on one machine (and
        # other clusters on it) need their own.
        env = {**self.env, "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
               "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
        # start_new_session: each node's processes (raylet, its workers, agents) in a process group of their own,
        # as separate machines are, so that kill_node can end one node by its group.
        with open(self.logs / f"{name}.log", "wb") as log:
            done = subprocess.run([str(BIN / "ray"), "start", *args, *self._node_ports()], env=env,
                                  start_new_session=True,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=180)
        if done.returncode:
            raise RuntimeError(f"ray start ({name}) failed; see {self.logs / f'{name}.log'}:\n"
                               + (self.logs / f"{name}.log").read_text()[-3000:])

    def add_worker(self, i: int, cpus: int = 2, store: str = str(150 * 1024 * 1024)) -> None:
        """Start worker node ``i`` (custom resource ``worker<i>``) joined to the head."""
        # Each node its own temp dir, as separate machines have: nodes sharing one would unpack the job's working
        # dir over each other (a driver's current directory deleted under it).
        self._start(f"worker{i}", ["--address", self.address, "--temp-dir", str(self.temp_dir / f"w{i}"),
                                   "--num-cpus", str(cpus), "--num-gpus", "0",
                                   "--object-store-memory", store, "--resources", json.dumps({f"worker{i}": 1})])

    def pids(self) -> list[int]:
        """Every process of this cluster: those whose command line names its temp dir."""
        import psutil

        mark = str(self.temp_dir)
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(mark in part for part in (p.info["cmdline"] or [])):
                    found.append(p.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self) -> None:
        """End every process of this cluster (each one's command line names its temp dir), children included."""
        import psutil

        for _ in range(3):
            pids = [p for p in self.pids() if p != os.getpid()]
            if not pids:
                return
            procs = []
            for pid in pids:
                try:
                    proc = psutil.Process(pid)
                    procs += proc.children(recursive=True) + [proc]
                except psutil.NoSuchProcess:
                    continue
            end_processes(procs)

    def node_pids(self, name: str) -> list[int]:
        """The processes of one node (``head``, ``worker0``, ...): those whose command line names its temp dir."""
        import psutil

        mark = str(self.temp_dir / ("h" if name == "head" else f"w{name.removeprefix('worker')}"))
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(part.endswith(mark) or f"{mark}/" in part for part in (p.info["cmdline"] or [])):
                    found.append(p.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def kill_node(self, name: str) -> list[int]:
        """Crash a node as a lost machine does: SIGKILL its raylet's process group, then every process of the node
        (children of the raylet included) that is left; returns the pids killed."""
        import signal

        import psutil

        procs: dict[int, psutil.Process] = {}
        for pid in self.node_pids(name):
            try:
                proc = psutil.Process(pid)
                for p in [proc, *proc.children(recursive=True)]:
                    procs[p.pid] = p
            except psutil.NoSuchProcess:
                continue
        raylets = [p for p in procs.values() if "raylet" in (p.name() or "")]
        for raylet in raylets:
            try:
                group = os.getpgid(raylet.pid)
                if group != os.getpgid(0):  # never our own group
                    os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(procs.values()), timeout=10)
        return sorted(procs)

    def nodes(self) -> dict[str, dict]:
        """Node name (the custom resource each node carries: ``head``, ``worker0``, ...) -> its record in Ray's
        state API (``node_id``, ``state``, ...)."""
        done = self.ray("list", "nodes", "--address", self.dashboard, "--detail", "--format", "json",
                        "--limit", "1000")
        if done.returncode:
            raise RuntimeError(f"ray list nodes failed: {done.stderr[-2000:]}")
        out = {}
        for node in json.loads(done.stdout):
            for key in node.get("resources_total", {}):
                if key == "head" or (key.startswith("worker") and key[6:].isdigit()):
                    out[key] = node
        return out

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``ray`` CLI with ``args``, in this cluster's environment; output captured as text."""
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)


def submit(cluster: Cluster, args: list[str], timeout: float, log_path: Path) -> tuple[int, float]:
    """``ray job submit --working-dir <repo> -- python jobs/pipeline.py ARGS``; returns (exit code, seconds)."""
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        try:
            done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
                                   "--working-dir", str(ROOT), "--", "python", "jobs/pipeline.py", *args],
                                  env=cluster.env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - started


def start_job(cluster: Cluster, args: list[str], log_path: Path, script: str = "jobs/pipeline.py") -> subprocess.Popen:
    """``ray job submit`` of ``script`` ARGS in the background (the caller waits for it, or kills it)."""
    log = open(log_path, "wb")
    try:
        return subprocess.Popen([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir",
                                 str(ROOT), "--", "python", script, *args], env=cluster.env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor


def alive_actors(cluster: Cluster) -> list[dict]:
    """The alive actors (class_name, node_id, ...), from Ray's state API."""
    done = cluster.ray("list", "actors", "--address", cluster.dashboard, "--detail", "--format", "json",
                       "--limit", "10000", "--filter", "state=ALIVE")
    if done.returncode:
        raise RuntimeError(f"ray list actors failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def actor_nodes(cluster: Cluster) -> dict[str, set[str]]:
    """Actor class name -> the node ids its actors ran on (alive or dead), from Ray's state API."""
    done = cluster.ray("list", "actors", "--address", cluster.dashboard, "--detail", "--format", "json",
                       "--limit", "10000")
    if done.returncode:
        raise RuntimeError(f"ray list actors failed: {done.stderr[-2000:]}")
    out: dict[str, set[str]] = {}
    for actor in json.loads(done.stdout):
        out.setdefault(actor.get("class_name", ""), set()).add(actor.get("node_id") or "")
    return out


def start_openai_server(log_dir: Path, latency: float = 0.05) -> tuple[subprocess.Popen, str]:
    """``python -m ray_e5.testing.openai_server`` (16 slots, ``latency`` s per answer, no faults) on a free port,
    in a session of its own, logging to ``log_dir/testserver.log``; returns the process (end it with
    :func:`kill_tree`) and its base URL (``http://127.0.0.1:<port>/v1``)."""
    port = free_port()
    log = open(log_dir / "testserver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ray_e5.testing.openai_server", "--port", str(port), "--latency",
                             str(latency), "--slots", "16"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)
    wait_port(port, 60, proc)
    return proc, f"http://127.0.0.1:{port}/v1"


def smoke_args(run_dir: str, data_dir: str, base_url: str, serve_port: int, train_workers: int = 2,
               extra: list[str] | None = None) -> list[str]:
    """jobs/pipeline.py arguments: configs/smoke.yaml on an object-store run and data dir, generation through the
    test server on up to 4 actors, training on ``train_workers`` DeepSpeed ZeRO-2 workers (1 torch thread each)."""
    sets = [f"run_dir={run_dir}", f"data_dir={data_dir}",
            "generate.backend=endpoint", f"generate.base_url={base_url}", "generate.model=test-writer",
            "generate.prompt_style=chat", "generate.actors=4", "generate.concurrency=2", "generate.actor_cpus=0.25",
            f"train.num_workers={train_workers}", "train.torch_threads=1",
            # a worker node's 2 CPUs per training worker: the 2 workers cannot share a node
            f"train.cpus_per_worker={2 if train_workers > 1 else 1}",
            *(["train.engine=deepspeed", "train.zero_stage=2", "train.cross_device_negatives=true"]
              if train_workers > 1 else []),
            "train.max_steps=6", "train.checkpoint_every=3",
            "evaluate.tasks=[{path: stsbenchmark, max_samples: 100}]",
            "evaluate.models=[{label: trained, model: '{run_dir}/embedder'}]", "evaluate.cpus_per_worker=1",
            f"serve.port={serve_port}", *(extra or [])]
    return ["--config", "configs/smoke.yaml", *[a for s in sets for a in ("--set", s)]]


def openai_check(port: int, model: str = "ray-e5-smoke") -> int:
    """Embed two texts through the openai client at 127.0.0.1:``port``; returns the vectors' dimension."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=2)
    r = client.embeddings.create(model=model, input=["how do rockets reach orbit", "Rockets burn fuel."])
    return len(r.data[0].embedding)
