"""Corpus embedding throughput: `ray-e5 embed --input --output` against sentence-transformers' multi-process encode.

The same texts (SciFact's 5,183 abstracts, title + text; and a synthetic corpus of short texts, ``--synthetic N``)
embedded by

- ray-e5: :func:`ray_e5.embed.run.embed_corpus` on a local Ray cluster of ``--cpus`` CPUs (an autoscaling pool of
  1..``--cpus`` one-CPU actors, token-budgeted length-sorted batches, Parquet shards written), wall time from the
  call to the last shard, actor start-up and model load included;
- sentence-transformers: ``model.encode(texts, pool=model.start_multi_process_pool(["cpu"] * cpus))`` on the same
  local model directory, truncating where the Embedder does (pool start-up included, as ours includes the actors'), one torch thread per process.

Prints rows/s for each and the ratio, and checks that the vectors agree (mean cosine). ``--nodes 1 2`` runs ray-e5
alone on a simulated cluster (``ray.cluster_utils.Cluster``: a head with no CPU and N worker nodes of
``--cpus-per-node`` CPUs) and prints the speed-up against linear.

    python bench/bench_embed_corpus.py --corpora scifact                    # MiniLM on SciFact
    python bench/bench_embed_corpus.py --corpora scifact synthetic --synthetic 100000 --models minilm-l6 gemma3-270m
    python bench/bench_embed_corpus.py --corpora scifact --nodes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SCIFACT = Path(os.environ.get("RAY_E5_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")) \
    / "scifact" / "corpus.jsonl"
WORDS = ("cell protein gene binding tumour receptor signal pathway mouse human dose trial effect model patients "
         "increase reduced levels expression risk").split()


def corpus(name: str, synthetic: int, tmp: Path, limit: int | None = None) -> tuple[Path, list[str], list[str]]:
    """A JSONL file of id, text for the corpus, with its ids and texts."""
    if name == "scifact":
        rows = [json.loads(line) for line in open(SCIFACT)]
        ids = [str(r["_id"]) for r in rows]
        texts = [f"{r.get('title', '')} {r.get('text', '')}".strip() for r in rows]
        if limit:
            ids, texts = ids[:limit], texts[:limit]
    else:
        rng = np.random.default_rng(0)
        ids = [f"s{i}" for i in range(synthetic)]
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 16)))) for _ in range(synthetic)]
    path = tmp / f"{name}.jsonl"
    with open(path, "w") as f:
        for i, t in zip(ids, texts):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    return path, ids, texts


def ours(path: Path, model: str, cpus: int, out: Path, block_bytes: int = 65536, address: str | None = None,
         dtype: str | None = None) -> tuple[float, dict]:
    import ray

    from ray_e5.cluster import connect
    from ray_e5.config import load_config
    from ray_e5.embed.run import embed_corpus

    if not ray.is_initialized():
        connect(address, num_cpus=cpus)
    config = load_config(None, [f"embed.input={path}", f"embed.output={out}", f"embed.model={model}",
                                f"embed.max_actors={cpus}", f"embed.block_bytes={block_bytes}",
                                *([f"embed.dtype={dtype}"] if dtype else [])])
    began = time.time()
    summary = embed_corpus(config, log=lambda *_: None)
    return time.time() - began, summary


def theirs(texts: list[str], model: str, cpus: int) -> tuple[float, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    from ray_e5.model.references import resolve_backbone

    from ray_e5.model import Embedder

    st = SentenceTransformer(resolve_backbone(model).path, device="cpu")
    # the same truncation as ours (MiniLM's sentence-transformers config says 256; the Embedder takes its 512):
    # else the two sides neither do the same work nor give the same vectors
    st.max_seq_length = Embedder.load(model).settings.max_length
    began = time.time()
    pool = st.start_multi_process_pool(["cpu"] * cpus)
    try:
        vectors = st.encode(texts, pool=pool, batch_size=32, normalize_embeddings=True)
    finally:
        st.stop_multi_process_pool(pool)
    return time.time() - began, np.asarray(vectors, dtype=np.float32)


def compare(args) -> None:
    import pyarrow.parquet as pq

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.corpora:
            path, ids, texts = corpus(name, args.synthetic, tmp, args.limit)
            for model in args.models:
                load = os.getloadavg()[0]
                t_ours, summary = ours(path, model, args.cpus, tmp / f"out-{name}-{model}", args.block_bytes,
                                       dtype=args.dtype)
                t_st, st_vectors = theirs(texts, model, args.cpus)
                table = pq.read_table(str(tmp / f"out-{name}-{model}"))
                got = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))
                mine = np.array([got[i] for i in ids], dtype=np.float32)
                cos = float(((mine * st_vectors).sum(1) / np.linalg.norm(mine, axis=1)
                             / np.linalg.norm(st_vectors, axis=1)).mean())
                row = {"corpus": name, "model": model, "rows": len(texts), "ray_e5_s": round(t_ours, 1),
                       "ray_e5_rows_s": round(len(texts) / t_ours, 1), "st_s": round(t_st, 1),
                       "st_rows_s": round(len(texts) / t_st, 1), "ratio": round(t_st / t_ours, 2),
                       "mean_cosine": round(cos, 5), "dtype": args.dtype or "auto (default)", "load_before": round(load, 1),
                       "load_after": round(os.getloadavg()[0], 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nmachine: {os.cpu_count()} cores, {args.cpus} used by each side; ratio = ray-e5 rows/s / "
          "sentence-transformers rows/s (both include start-up: actors / pool processes and model loads)")
    print(f"{'corpus':<10}{'model':<14}{'rows':>8}{'ray-e5 rows/s':>15}{'ST rows/s':>11}{'ratio':>7}{'cos':>9}{'load':>11}")
    for r in results:
        print(f"{r['corpus']:<10}{r['model']:<14}{r['rows']:>8}{r['ray_e5_rows_s']:>15}{r['st_rows_s']:>11}"
              f"{r['ratio']:>7}{r['mean_cosine']:>9}{r['load_before']:>5}->{r['load_after']:<5}")


def node_scaling(args) -> None:
    import ray
    from ray.cluster_utils import Cluster

    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, ids, texts = corpus(args.corpora[0], args.synthetic, tmp, args.limit)
        for n in args.nodes:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            for _ in range(n):
                cluster.add_node(num_cpus=args.cpus_per_node)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, runtime_env=env)
            try:
                times[n], summary = ours(path, args.models[0], n * args.cpus_per_node, tmp / f"nodes{n}", args.block_bytes)
                print(f"{n} node(s): {times[n]:.1f} s, {summary['rows_written']} rows, "
                      f"{summary['rows_written'] / times[n]:.1f} rows/s (load {os.getloadavg()[0]:.1f})", flush=True)
            finally:
                ray.shutdown()
                cluster.shutdown()
    base = args.nodes[0]
    print(f"\nmachine: {os.cpu_count()} cores; nodes of {args.cpus_per_node} CPU(s); {len(texts)} rows")
    print(f"{'nodes':>5}{'wall s':>10}{'rows/s':>10}{'speed-up':>10}{'linear':>8}")
    for n in args.nodes:
        print(f"{n:>5}{times[n]:>10.1f}{len(texts) / times[n]:>10.1f}{times[base] / times[n]:>10.2f}{n / base:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=["scifact", "synthetic"], choices=["scifact", "synthetic"])
    parser.add_argument("--synthetic", type=int, default=100_000, help="rows of the synthetic short-text corpus")
    parser.add_argument("--limit", type=int, default=None,
                        help="SciFact: its first N abstracts only (a 2-core machine embeds some 10 abstracts/s)")
    parser.add_argument("--block-bytes", type=int, default=65536, help="ray-e5's JSONL block size")
    parser.add_argument("--models", nargs="+", default=["minilm-l6"], help="minilm-l6, gemma3-270m, ...")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=None,
                        help="ray-e5's weights (embed.dtype); sentence-transformers stays in fp32, its default")
    parser.add_argument("--nodes", type=int, nargs="*", default=None, help="ray-e5 on 1..N simulated worker nodes")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.nodes:
        node_scaling(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
