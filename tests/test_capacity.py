"""A request the cluster can never satisfy fails fast, naming the config key and the largest node."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ray_e5.capacity import Demand, Offer, unfit
import ray_e5.testing.cluster as cs

ROOT = Path(__file__).resolve().parents[1]


def test_a_bundle_no_node_holds_names_the_key_and_the_largest_node():
    nodes = [Offer("node 10.0.0.1", {"CPU": 1.0}), Offer("node 10.0.0.2", {"CPU": 1.0})]
    problems = unfit([Demand("train.cpus_per_worker", "training worker", {"CPU": 2.0}, 1)], nodes)
    assert len(problems) == 1 and "train.cpus_per_worker" in problems[0] and "{'CPU': 1}" in problems[0], problems
    # what fits is not refused; a count beyond what a fixed cluster holds is
    assert unfit([Demand("k", "worker", {"CPU": 1.0}, 2)], nodes) == []
    over = unfit([Demand("train.num_workers", "worker", {"CPU": 1.0}, 3)], nodes)
    assert len(over) == 1 and "room for 2" in over[0], over
    # a node type the autoscaler can add (up to 4 of) makes both fit; a GPU it does not have does not
    types = nodes + [Offer("node type gpu_pool", {"CPU": 8.0, "GPU": 1.0}, 4)]
    assert unfit([Demand("k", "worker", {"CPU": 2.0}, 3)], types) == []
    gpu = unfit([Demand("serve.num_gpus", "replica", {"CPU": 1.0, "GPU": 2.0}, 1)], types)
    assert len(gpu) == 1 and "autoscaler" in gpu[0] and "gpu_pool" in gpu[0], gpu
    # an autoscaler whose node types cannot be read may add anything: nothing is refused
    assert unfit([Demand("k", "worker", {"CPU": 64.0}, 1)], nodes, types_known=False) == []


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_training_that_cannot_fit_a_cluster_of_one_cpu_nodes_stops_at_once(shared_data, tmp_path):
    """configs/smoke.yaml as shipped (a training worker of 2 CPUs) on a head and a worker node of 1 CPU each, the
    cluster a new user may have: the stage stops before starting workers, naming the key, instead of waiting."""
    temp = Path(tempfile.mkdtemp(prefix="re5cap_", dir="/tmp"))
    cluster = cs.Cluster(1, {}, temp, head_cpus=1, worker_cpus=1)
    try:
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ray_e5.cli", "train", "--config", "smoke",
                               "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data_dir={shared_data}",
                               "--set", "train.synthetic=false"],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=500)
        took = time.perf_counter() - started
    finally:
        cluster.stop()
    print(f"stopped after {took:.1f} s with exit {done.returncode}:\n{done.stderr[-1500:]}")
    assert done.returncode != 0
    assert "train.cpus_per_worker" in done.stderr and "{'CPU': 1}" in done.stderr, done.stderr[-3000:]
