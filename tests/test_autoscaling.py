"""Autoscaling, shown (issue 15, item 4): Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER=1``) with the node
types of ``cluster.yaml`` (its head and its CPU pool), a generation job submitted to a cluster of the head alone:
the autoscaler adds CPU-pool nodes for the generation actors, and removes them once they are idle.

The head is started with ``ray start --head --autoscaling-config=<fake config>`` (ports and temp dir of its own,
as :class:`ray_e5.testing.cluster.Cluster` does; Ray's ``AutoscalingCluster`` runs ``ray stop --force``, which
would end every Ray on the machine). Its monitor launches fake nodes as local raylets. The generation actors ask
for more CPUs than the head offers (``generate.actor_cpus`` = a whole CPU-pool node), so they can only run on nodes
the autoscaler adds; the idle timeout is 0.1 minute. (Ray Data's actor pool starts with one actor and grows into
resources that exist, so at this size one pool node is added; the assertion is "at least one, at most the pool's
max_workers, and none left after idle".)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import ray_e5.testing.cluster as cs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(900)]

POOL = "cpu_pool"
MAX_NODES = 3  # of the pool's max_workers: bounded for one machine


def fake_config(gcs_address: str) -> dict:
    """cluster.yaml's head and CPU pool as a fake multi-node cluster config (no cloud, no SSH)."""
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = real["available_node_types"][real["head_node_type"]]
    pool = real["available_node_types"][POOL]
    return {
        "cluster_name": "ray-e5-fake", "max_workers": MAX_NODES, "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": 0.1,
        # use_node_id_as_ip: the autoscaler knows nodes by address, and every fake node has this machine's; no SSH
        # updaters (the fake nodes start as Ray nodes at once)
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_launch_config_check": True, "disable_node_updaters": True},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": dict(head["resources"]), "node_config": {}, "max_workers": 0},
            POOL: {"resources": {**pool["resources"], "object_store_memory": 100 * 1024 * 1024},
                   "node_config": {}, "min_workers": pool.get("min_workers", 0),
                   "max_workers": min(MAX_NODES, pool["max_workers"])},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def alive_nodes(cluster) -> list[dict]:
    done = cluster.ray("list", "nodes", "--address", cluster.dashboard, "--detail", "--format", "json",
                       "--limit", "1000", "--filter", "state=ALIVE")
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)


def test_generation_job_scales_the_cpu_pool_up_from_zero_and_back(shared_data, tmp_path):
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head_cpus = real["available_node_types"][real["head_node_type"]]["resources"].get("CPU", 0)
    pool_cpus = real["available_node_types"][POOL]["resources"]["CPU"]
    actor_cpus = pool_cpus  # a whole pool node per actor (more than the head offers): 2 actors, 2 nodes
    assert actor_cpus > head_cpus, "the test needs actors the head cannot hold"
    temp = Path(tempfile.mkdtemp(prefix="re5a_", dir="/tmp"))
    server = cluster = job = None
    try:
        server, base_url = cs.start_openai_server(tmp_path, latency=0.5)
        port = cs.free_port()
        config_path = tmp_path / "fake-cluster.json"
        config_path.write_text(json.dumps(fake_config(f"127.0.0.1:{port}")))
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        # the head's node id is the one the fake provider lists as its head (each fake node gets its own)
        env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        # the head as cluster.yaml has it, on the port the fake provider's nodes join
        cluster = cs.Cluster(0, env, temp, head_cpus=head_cpus, port=port,
                             head_args=("--autoscaling-config", str(config_path)))
        nodes = alive_nodes(cluster)
        assert len(nodes) == 1, nodes  # the head alone: zero worker nodes
        run_dir = tmp_path / "run"
        args = ["--config", "configs/smoke.yaml"] + [a for s in (
            f"run_dir={run_dir}", f"data_dir={shared_data}", "generate.backend=endpoint",
            f"generate.base_url={base_url}", "generate.model=test-writer", "generate.prompt_style=chat",
            "generate.num_examples=32", "generate.actors=2", "generate.concurrency=2",
            f"generate.actor_cpus={actor_cpus}", "generate.time_budget_s=400") for a in ("--set", s)]
        started = time.time()
        job = cs.start_job(cluster, args, tmp_path / "job.log", script="jobs/generate.py")
        peak, seen = 1, []
        while job.poll() is None and time.time() - started < 420:
            count = len(alive_nodes(cluster))
            assert count <= MAX_NODES + 1, f"more nodes than the pool's max_workers: {seen}"
            if peak == 1 and time.time() - started > 180:
                pytest.fail("no node added in 180 s; monitor log:\n" + _monitor_log(temp)[-4000:])
            if count != (seen[-1][1] if seen else 1):
                seen.append((round(time.time() - started, 1), count))
            peak = max(peak, count)
            time.sleep(2)
        log = (tmp_path / "job.log").read_text(errors="replace")
        assert job.poll() == 0, log[-6000:]
        up = time.time() - started
        manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
        # after the job: idle nodes go (idle timeout 0.1 min, the monitor's 1 s update interval)
        while len(alive_nodes(cluster)) > 1 and time.time() - started < up + 180:
            time.sleep(2)
        after = alive_nodes(cluster)
        down = time.time() - started - up
        print(f"generation job: {manifest['examples']} examples in {up:.0f} s; alive nodes over time {seen}; "
              f"peak {peak} (head + {peak - 1} {POOL} nodes of {pool_cpus} CPUs); back to {len(after)} node(s) "
              f"{down:.0f} s after the job")
        assert manifest["examples"] > 0
        assert peak >= 2, f"the autoscaler added no node: {seen}"
        assert len(after) == 1 and after[0]["is_head_node"], after
    finally:
        if job is not None and job.poll() is None:
            cs.kill_tree(job.pid)
        if cluster is not None:
            cluster.stop()
        if server is not None:
            cs.kill_tree(server.pid)
        shutil.rmtree(temp, ignore_errors=True)



def _monitor_log(temp: Path) -> str:
    logs = sorted(temp.glob("h/session_2*/logs/monitor.log"))
    return logs[-1].read_text(errors="replace") if logs else "(no monitor.log)"
