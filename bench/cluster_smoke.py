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
``bucket_files``, ``actor_nodes``, ``alive_actors``) live in :mod:`ray_e5.testing.cluster`, which the cluster
tests use too. Everything started is stopped in a ``finally`` (by process id).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ray_e5.testing.cluster import (SHARED_DATA, Cluster, Moto, actor_nodes, bucket_files, free_port, kill_tree,
                                    openai_check, smoke_args, start_moto, start_openai_server, submit,
                                    upload_smoke_data)


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
        server, base_url = start_openai_server(base)
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
            kill_tree(server.pid)
        moto.stop()


if __name__ == "__main__":
    sys.exit(main())
