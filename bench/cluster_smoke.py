"""A simulated multi-node Ray cluster on this machine, with an S3-compatible object store on loopback, running the
smoke pipeline as a user submits it.

    python bench/cluster_smoke.py                 # head + 2 worker nodes, moto's S3 server, `ray job submit`
    python bench/cluster_smoke.py --compare       # also the same job on 1 node: the overhead of distribution
    python bench/cluster_smoke.py --workers 3 --keep   # leave cluster and store up (prints how to stop them)

What it does:
1. starts moto's standalone S3 server (``moto_server``, from ``pip install 'moto[server]'``) on a free loopback
   port, creates a bucket, uploads the labeled data the smoke config names (SNLI triplets, STS-B) under
   ``s3://<bucket>/data``; endpoint and credentials reach every Ray process through the standard variables
   (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``);
2. starts ray-e5's OpenAI-compatible test server as the generation backend (a hosted API's stand-in: its
   actors are not pinned to one node, as llama.cpp's are);
3. starts a head (``ray start --head``, 1 CPU) and worker nodes (2 CPUs each) on separate ports, under their own
   temp dir (so that stopping them touches no other Ray on the machine);
4. ``ray job submit --working-dir . -- python jobs/pipeline.py --config configs/smoke.yaml --set run_dir=s3://...
   --set data_dir=s3://...`` with training on 2 workers (DeepSpeed ZeRO-2 over gloo, cross-device negatives) and
   generation on up to 4 actors;
5. checks the bucket (synthetic shards, embedder, eval report, loss curve), where the generation actors and the
   training workers ran (Ray's state API), asks the served embedder through the openai client, and prints wall
   time and the bytes written to the object store.

The helpers (``start_moto``, ``upload``, ``Cluster`` (with ``kill_node``), ``submit``, ``start_job``,
``bucket_files``, ``actor_nodes``, ``alive_actors``) are what ``tests/test_cluster.py`` and
``tests/test_cluster_failures.py`` use. Everything started is stopped in a ``finally`` (by process id).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from ray_e5.net import free_port

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAY_E5_SHARED_DATA", ROOT / ".." / "shared" / "data")).resolve()
SMOKE_DATA = ["snli_triplets/train.jsonl", "stsbenchmark/task.json", "stsbenchmark/train.jsonl",
              "stsbenchmark/test.jsonl"]
BIN = Path(sys.executable).parent



def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
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


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


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
        _wait_port(self.port, 30, self.proc)
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
        _kill_tree(self.proc.pid)
        self.log.close()


def require_moto() -> None:
    """moto's server is a dev dependency: a cluster test without it fails (it never skips what it exists to show)."""
    if shutil.which("moto_server", path=str(BIN)) is None:
        raise RuntimeError(f"moto_server is not installed in {BIN}: pip install 'moto[server]' (in the dev extra)")


def start_moto(log_dir: Path, auth: bool = False) -> Moto:
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
        # Each node its own temp dir, as separate machines have: nodes sharing one would unpack the job's working
        # dir over each other (a driver's current directory deleted under it).
        self._start(f"worker{i}", ["--address", self.address, "--temp-dir", str(self.temp_dir / f"w{i}"),
                                   "--num-cpus", str(cpus), "--num-gpus", "0",
                                   "--object-store-memory", store, "--resources", json.dumps({f"worker{i}": 1})])

    def pids(self) -> list[int]:
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
            for p in procs:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=8)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass

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


def test_server(log_dir: Path, latency: float = 0.05) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_dir / "testserver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ray_e5.generate.testserver", "--port", str(port), "--latency",
                             str(latency), "--slots", "16"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)
    _wait_port(port, 60, proc)
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
            "evaluate.models=[{label: trained, ref: '{run_dir}/embedder'}]", "evaluate.cpus_per_worker=1",
            f"serve.port={serve_port}", *(extra or [])]
    return ["--config", "configs/smoke.yaml", *[a for s in sets for a in ("--set", s)]]


def openai_check(port: int, model: str = "ray-e5-smoke") -> int:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=2)
    r = client.embeddings.create(model=model, input=["how do rockets reach orbit", "Rockets burn fuel."])
    return len(r.data[0].embedding)


def run_once(workers: int, base_dir: Path, moto: Moto, bucket: str, data_uri: str, base_url: str,
             timeout: float, name: str, keep: bool = False) -> dict:
    """One cluster of 1 + ``workers`` nodes, one smoke job into ``s3://<bucket>/runs/<name>``; a summary dict."""
    temp = Path(tempfile.mkdtemp(prefix="re5c_", dir="/tmp"))
    run_uri = f"s3://{bucket}/runs/{name}"
    serve_port = free_port()
    cluster = Cluster(workers, moto.env, temp, head_cpus=1 if workers else 3)
    summary: dict = {"nodes": 1 + workers, "run_dir": run_uri, "temp_dir": str(temp)}
    try:
        code, seconds = submit(cluster, smoke_args(run_uri, data_uri, base_url, serve_port, 2 if workers else 1),
                               timeout, base_dir / f"job-{name}.log")
        summary.update(exit_code=code, seconds=round(seconds, 1), log=str(base_dir / f"job-{name}.log"))
        files = bucket_files(moto, run_uri)
        summary["files"] = files
        summary["bytes_written"] = sum(files.values())
        try:
            summary["actors"] = {k: sorted(v) for k, v in actor_nodes(cluster).items()}
        except Exception as err:  # noqa: BLE001 - reported, the checks that need it fail on their own
            summary["actors_error"] = str(err)
        if code == 0:
            try:
                summary["served_dimension"] = openai_check(serve_port)
            except Exception as err:  # noqa: BLE001
                summary["serve_error"] = f"{type(err).__name__}: {err}"
    finally:
        if keep:
            print(f"cluster left up: RAY_ADDRESS={cluster.dashboard}; stop it by ending the processes whose "
                  f"command line names {temp}")
        else:
            cluster.stop()
            shutil.rmtree(temp, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="worker nodes beside the head (default 2)")
    parser.add_argument("--compare", action="store_true", help="also run the job on a 1-node cluster")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each job")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up after the job")
    args = parser.parse_args(argv)
    if not (SHARED_DATA / "stsbenchmark").is_dir():
        print(f"needs the labeled data of ../shared/data (looked in {SHARED_DATA}); set RAY_E5_SHARED_DATA")
        return 2
    base = Path(tempfile.mkdtemp(prefix="ray_e5_cluster_smoke_"))
    moto = start_moto(base)
    server = None
    try:
        bucket = "ray-e5"
        moto.create_bucket(bucket)
        data_uri = upload_smoke_data(moto, bucket)
        server, base_url = test_server(base)
        results = [run_once(args.workers, base, moto, bucket, data_uri, base_url, args.timeout, "multi", args.keep)]
        if args.compare:
            results.append(run_once(0, base, moto, bucket, data_uri, base_url, args.timeout, "single"))
        for r in results:
            files = r.pop("files", {})
            shards = sum(1 for f in files if f.startswith("synthetic/") and f.endswith(".parquet"))
            print(f"[{r['nodes']} node(s)] exit {r['exit_code']} in {r['seconds']} s; {len(files)} objects, "
                  f"{r['bytes_written'] / 1e6:.1f} MB written to {r['run_dir']}; synthetic shards {shards}, "
                  f"embedder {'embedder/ray_e5.json' in files}, report {'eval/report.json' in files}, "
                  f"loss curve {'train/loss.png' in files}; served dimension {r.get('served_dimension')}"
                  + (f"; serve error {r['serve_error']}" if r.get("serve_error") else ""))
            for cls, nodes in sorted(r.get("actors", {}).items()):
                if any(k in cls for k in ("MapWorker", "RayTrainWorker", "Completer", "EvalWorker")):
                    print(f"    {cls}: {len(nodes)} node(s)")
            print(f"    job log: {r['log']}")
        if len(results) == 2 and results[1]["seconds"]:
            print(f"wall time 3 nodes / 1 node on the same cores: {results[0]['seconds'] / results[1]['seconds']:.2f}x")
        return 0 if all(r["exit_code"] == 0 for r in results) else 1
    finally:
        if server is not None:
            _kill_tree(server.pid)
        moto.stop()


if __name__ == "__main__":
    sys.exit(main())
