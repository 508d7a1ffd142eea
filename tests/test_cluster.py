"""A simulated multi-node cluster, as users run it: a head and 2 worker nodes (``ray start``, ports and temp dirs
of their own, in subprocesses: the session's ``ray_cluster`` is untouched), moto's S3 server on loopback holding
the run directory and the labeled data, and ``ray job submit --working-dir . -- python jobs/pipeline.py --config
configs/smoke.yaml --set run_dir=s3://... --set data_dir=s3://...``. Helpers: :mod:`ray_e5.testing.cluster`.

Slow (a few minutes on 2 cores): generation through the OpenAI-compatible test server on up to 4 actors, 6
training steps of Gemma 3 270M on 2 DeepSpeed ZeRO-2 workers (gloo, cross-device negatives), 100 STS-B pairs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

import ray_e5.testing.cluster as cs

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def cluster(shared_data, tmp_path_factory):
    cs.require_moto()
    base = tmp_path_factory.mktemp("cluster")
    moto = cs.start_moto(base)
    server = ray = None
    temp = Path(tempfile.mkdtemp(prefix="re5c_", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    try:
        moto.create_bucket("ray-e5")
        data_uri = cs.upload_smoke_data(moto, "ray-e5")
        server, base_url = cs.start_openai_server(base)
        ray = cs.Cluster(2, moto.env, temp)
        yield {"moto": moto, "ray": ray, "data": data_uri, "base_url": base_url, "logs": base,
               "run": "s3://ray-e5/runs/cluster", "serve_port": cs.free_port()}
    finally:
        if ray is not None:
            ray.stop()
        if server is not None:
            cs.kill_tree(server.pid)
        moto.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _job(cluster, stages: str, name: str) -> None:
    args = cs.smoke_args(cluster["run"], cluster["data"], cluster["base_url"], cluster["serve_port"])
    code, seconds = cs.submit(cluster["ray"], [*args, "--stages", stages], 1200, cluster["logs"] / f"{name}.log")
    log = (cluster["logs"] / f"{name}.log").read_text(errors="replace")
    print(f"job {name} ({stages}): exit {code} in {seconds:.0f} s")
    assert code == 0, log[-6000:]


def test_pipeline_job_on_three_nodes_writes_everything_to_the_bucket(cluster):
    _job(cluster, "generate,train,evaluate", "pipeline")
    files = cs.bucket_files(cluster["moto"], cluster["run"])
    shards = [f for f in files if f.startswith("synthetic/") and f.endswith(".parquet")]
    assert shards and all(files[f] > 0 for f in shards), sorted(files)
    assert files.get("embedder/ray_e5.json", 0) > 0 and any(f.startswith("embedder/adapter/") for f in files)
    assert files.get("eval/report.json", 0) > 0 and files.get("train/loss.png", 0) > 0
    fs = cluster["moto"].filesystem()
    base = cluster["run"].removeprefix("s3://")
    with fs.open_input_stream(f"{base}/train/metrics.jsonl") as src:  # written by rank 0, read through the URI
        losses = [json.loads(line) for line in src.read().decode().splitlines() if '"loss"' in line]
    assert losses and all(m["loss"] > 0 for m in losses)
    with fs.open_input_stream(f"{base}/eval/report.json") as src:
        report = json.loads(src.read())
    assert "trained" in json.dumps(report)
    nodes = cs.actor_nodes(cluster["ray"])
    completers = set().union(*[v for k, v in nodes.items() if "ChatCompleter" in k] or [set()])
    trainers = nodes.get("RayTrainWorker", set())
    print(f"generation actors on {len(completers)} node(s), training workers on {len(trainers)} node(s); "
          f"{sum(files.values()) / 1e6:.1f} MB in the bucket")
    assert len(completers) > 1, nodes
    assert len(trainers) == 2, nodes


def test_trained_embedder_serves_from_its_s3_uri(cluster):
    files = cs.bucket_files(cluster["moto"], cluster["run"])
    assert "embedder/ray_e5.json" in files, "the pipeline job left no embedder in the bucket (see its test)"
    _job(cluster, "serve", "serve")
    assert cs.openai_check(cluster["serve_port"]) > 0
