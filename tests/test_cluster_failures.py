"""Node failures in the simulated cluster (issue 15, item 5): a worker node killed mid-generation and another
killed mid-training, and the job still completes.

A head and 2 worker nodes (``ray start``, ports, temp dirs and process groups of their own), moto's S3 server on
loopback holding the run and the labeled data, the OpenAI-compatible test server (with latency, so that generation
lasts long enough to lose a node in the middle of it) as the generator, ``ray job submit`` of jobs/pipeline.py
(generate, train). While the job runs, the test

1. waits for the first synthetic shard in the bucket, then kills the worker node holding the most generation
   actors (SIGKILL of its raylet's process group: a lost machine), and adds a fresh node (what an autoscaler does);
2. waits for the first training checkpoint in the bucket, then kills a node holding a training worker, and adds
   a fresh node;

and checks: the job succeeded; every synthetic row is there once (ids unique, as many as the manifest says, the
rows written before the kill all kept); training resumed from its checkpoint in the bucket (a ``resumed`` event in
``metrics.jsonl``, steps continuing from it to the end, the learning-rate schedule continuing, not restarting).
Helpers: :mod:`ray_e5.testing.cluster`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import ray_e5.testing.cluster as cs

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]

RUN = "s3://ray-e5/runs/failures"
MAX_STEPS = 9
CHECKPOINT_EVERY = 3
EXAMPLES = 48


def _read(moto, uri: str) -> bytes:
    with moto.filesystem().open_input_stream(uri.removeprefix("s3://")) as src:
        return src.read()


def _shards(moto, files: dict[str, int]) -> list[str]:
    return sorted(f for f in files if re.fullmatch(r"synthetic/part-[^/]*\.parquet", f))


def _wait(what: str, job, log: Path, timeout: float, check):
    """Poll ``check()`` every second until it returns something truthy; fail if the job ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        if job.poll() is not None:
            pytest.fail(f"the job ended (exit {job.returncode}) before {what}:\n"
                        + log.read_text(errors="replace")[-6000:])
        time.sleep(1.0)
    pytest.fail(f"no {what} after {timeout:.0f} s:\n" + log.read_text(errors="replace")[-4000:])


def _busiest(cluster, candidates: list[str], actor_class: str) -> str | None:
    """The candidate node with the most alive actors whose class name contains ``actor_class``."""
    nodes = cluster.nodes()
    ids = {nodes[n]["node_id"]: n for n in candidates if n in nodes and nodes[n].get("state") == "ALIVE"}
    counts = {n: 0 for n in ids.values()}
    for actor in cs.alive_actors(cluster):
        if actor_class in actor.get("class_name", "") and actor.get("node_id") in ids:
            counts[ids[actor["node_id"]]] += 1
    busy = {n: c for n, c in counts.items() if c}
    return max(busy, key=busy.get) if busy else None


@pytest.fixture(scope="module")
def failures(shared_data, tmp_path_factory):
    cs.require_moto()
    base = tmp_path_factory.mktemp("failures")
    moto = cs.start_moto(base)
    server = cluster = job = None
    temp = Path(tempfile.mkdtemp(prefix="re5f_", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    log = base / "job.log"
    events: dict = {"log": log}
    try:
        moto.create_bucket("ray-e5")
        data_uri = cs.upload_smoke_data(moto, "ray-e5")
        # 1.5 s an answer, 8 in flight: generation lasts tens of seconds, shards flushed every 2 s
        server, base_url = cs.start_openai_server(base, latency=1.5)
        # a head with no CPUs (as cluster.yaml's was): the generation actors and the training workers can only run
        # on worker nodes, so that a killed node always holds some (the driver and Ray Train's controller take 0)
        cluster = cs.Cluster(2, moto.env, temp, head_cpus=0)
        args = cs.smoke_args(RUN, data_uri, base_url, cs.free_port(), extra=[
            f"generate.num_examples={EXAMPLES}", "generate.flush_every_s=2", "generate.shard_size=8",
            "generate.time_budget_s=600", f"train.max_steps={MAX_STEPS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.max_failures=3"])
        started = time.time()
        job = cs.start_job(cluster, [*args, "--stages", "generate,train"], log)

        # 1. mid-generation: rows already written, more planned
        def generating():
            files = cs.bucket_files(moto, f"{RUN}/synthetic")
            shards = [f"synthetic/{f}" for f in files if re.fullmatch(r"part-[^/]*\.parquet", f)]
            if not shards or "manifest.json" not in files:
                return None
            manifest = json.loads(_read(moto, f"{RUN}/synthetic/manifest.json"))
            if manifest["examples"] >= EXAMPLES:
                return None
            victim = _busiest(cluster, ["worker0", "worker1"], "ChatCompleter")
            return (victim, manifest["examples"]) if victim else None

        victim, written = _wait("a first synthetic shard while generation actors run", job, log, 600, generating)
        import pyarrow.parquet as pq

        fs = moto.filesystem()
        before = {r for f in _shards(moto, cs.bucket_files(moto, RUN))
                  for r in pq.read_table(f"{RUN.removeprefix('s3://')}/{f}", columns=["id"],
                                         filesystem=fs).column("id").to_pylist()}
        events["generation"] = {"node": victim, "rows_written": written, "ids_before": before,
                                "at_s": round(time.time() - started, 1), "pids": cluster.kill_node(victim)}
        print(f"killed {victim} mid-generation at {events['generation']['at_s']} s ({written} rows written of "
              f"{EXAMPLES} planned)")
        cluster.add_worker(2)

        # 2. mid-training: a checkpoint in the bucket, the last step not reached
        def training():
            files = cs.bucket_files(moto, f"{RUN}/train")
            steps = sorted({int(m.group(1)) for f in files if (m := re.search(r"checkpoint-(\d+)/", f))})
            if not steps or steps[-1] >= MAX_STEPS:
                return None
            alive = [n for n in ("worker1", "worker2", "worker0") if n != victim]
            node = _busiest(cluster, alive, "RayTrainWorker")
            return (node, steps[-1]) if node else None

        node, step = _wait("a training checkpoint while training workers run", job, log, 900, training)
        events["training"] = {"node": node, "checkpoint_step": step, "at_s": round(time.time() - started, 1),
                              "pids": cluster.kill_node(node)}
        print(f"killed {node} mid-training at {events['training']['at_s']} s (latest checkpoint: step {step})")
        cluster.add_worker(3)

        try:
            events["exit"] = job.wait(timeout=1200)
        except subprocess.TimeoutExpired:  # reported by the test
            events["exit"] = 124
        events["seconds"] = round(time.time() - started, 1)
        events["actors"] = cs.actor_nodes(cluster)
        yield {"moto": moto, "cluster": cluster, **events}
    finally:
        if job is not None and job.poll() is None:
            cs.kill_tree(job.pid)
        if cluster is not None:
            cluster.stop()
        if server is not None:
            cs.kill_tree(server.pid)
        moto.stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_job_survives_a_node_lost_in_generation_and_one_in_training(failures):
    log = failures["log"].read_text(errors="replace")
    print(f"job: exit {failures['exit']} in {failures['seconds']} s; generation node killed at "
          f"{failures['generation']['at_s']} s, training node at {failures['training']['at_s']} s")
    assert failures["exit"] == 0, log[-8000:]
    assert failures["generation"]["pids"] and failures["training"]["pids"]


def test_no_synthetic_row_lost_or_duplicated(failures):
    import pyarrow.parquet as pq

    moto = failures["moto"]
    fs = moto.filesystem()
    files = cs.bucket_files(moto, RUN)
    ids = [i for f in _shards(moto, files)
           for i in pq.read_table(f"{RUN.removeprefix('s3://')}/{f}", columns=["id"], filesystem=fs)
           .column("id").to_pylist()]
    manifest = json.loads(_read(moto, f"{RUN}/synthetic/manifest.json"))
    print(f"{len(ids)} synthetic rows in {len(_shards(moto, files))} shards; manifest: {manifest['examples']} "
          f"examples of {manifest['planned']} planned, drops {manifest.get('drops')}")
    assert len(ids) == len(set(ids)), "a synthetic row id is written twice"
    assert len(ids) == manifest["examples"] > failures["generation"]["rows_written"] > 0
    assert failures["generation"]["ids_before"] <= set(ids), "rows written before the node was lost are gone"


def test_training_resumed_from_its_checkpoint_and_continued_the_curve(failures):
    moto = failures["moto"]
    metrics = [json.loads(line) for line in _read(moto, f"{RUN}/train/metrics.jsonl").decode().splitlines()
               if line.strip()]
    resumed = [m for m in metrics if m.get("event") == "resumed"]
    steps = [m for m in metrics if "loss" in m]
    print(f"resumed at {[m['step'] for m in resumed]}; logged steps {[m['step'] for m in steps]}; "
          f"lr {[m['lr'] for m in steps]}")
    assert resumed, "no `resumed` event: training restarted from scratch or never lost a worker"
    at = resumed[-1]["step"]
    assert 0 < at <= failures["training"]["checkpoint_step"] + CHECKPOINT_EVERY and at % CHECKPOINT_EVERY == 0
    # one history: steps 1..MAX_STEPS once each, those after the resume continuing from it (not from 1)
    assert [m["step"] for m in steps] == list(range(1, MAX_STEPS + 1))
    index = metrics.index(resumed[-1])
    assert [m["step"] for m in metrics[index + 1:] if "loss" in m] == list(range(at + 1, MAX_STEPS + 1))
    # the optimizer and schedule came back with the checkpoint: warmup goes on rising from where it was
    lrs = [m["lr"] for m in steps]
    assert lrs[at] > lrs[0] and lrs == sorted(lrs), lrs
    summary = json.loads(_read(moto, f"{RUN}/train/summary.json"))
    assert summary.get("steps", summary.get("steps_done")) == MAX_STEPS, summary
    trainers = failures["actors"].get("RayTrainWorker", set())
    print(f"training workers ran on {len(trainers)} node(s) over the run")
    assert len(trainers) >= 3, failures["actors"]
