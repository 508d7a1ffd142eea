"""Quality of contrastive LoRA training: the packaged Gemma 3 270M before and after training, on CPU.

Trains on ../shared/data/snli_triplets plus STS-B train pairs scoring >= 4 (configs/quickstart.yaml's labeled
sources), then scores base and trained model, each with and without the instruction:
  - STS-B test: Spearman correlation of cosine similarity with the gold score (1379 pairs);
  - SciFact (BEIR test, 300 claims): nDCG@10, on a corpus subsample (every relevant abstract plus seeded random
    others, ``--corpus`` documents in all, truncated to ``--eval-max-length`` tokens) to keep CPU time reasonable. Scores on a subsample are higher than on
    the full corpus; both models see the same subsample.

    python bench/quality_train.py --run-dir runs/quality [--max-time-s 840] [--max-steps N] [--skip-train] [--corpus 1000]

Scores use ``ray_e5.evaluate.score_local_task`` when the eval stage provides it, else scipy (Spearman) and
pytrec_eval (nDCG@10, the scorer mteb uses).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(os.environ.get("RAY_E5_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()
STS_INSTRUCTION = "Retrieve semantically similar text."
SCIFACT_INSTRUCTION = "Given a scientific claim, retrieve documents that support or refute the claim"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sts_spearman(embedder, instruction: str | None) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    rows = _jsonl(DATA / "stsbenchmark" / "test.jsonl")
    a = embedder.encode([r["sentence1"] for r in rows], instruction=instruction)
    b = embedder.encode([r["sentence2"] for r in rows], instruction=instruction)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(spearmanr(cos, [r["score"] for r in rows]).statistic)


def scifact_subsample(corpus_size: int, seed: int = 0):
    folder = DATA / "scifact"
    corpus = {d["_id"]: d for d in _jsonl(folder / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in _jsonl(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, score = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(score)
    queries = {q: t for q, t in queries.items() if q in qrels}
    relevant = sorted({d for rel in qrels.values() for d in rel})
    others = sorted(set(corpus) - set(relevant))
    random.Random(seed).shuffle(others)
    keep = relevant + others[:max(0, corpus_size - len(relevant))]
    docs = {d: (corpus[d].get("title", "") + " " + corpus[d]["text"]).strip() for d in keep}
    return queries, docs, qrels


def scifact_ndcg(embedder, instruction: str | None, data, doc_vectors=None) -> tuple[float, object]:
    import numpy as np
    import pytrec_eval

    queries, docs, qrels = data
    doc_ids = list(docs)
    if doc_vectors is None:
        doc_vectors = embedder.encode([docs[d] for d in doc_ids], batch_size=16)
    qids = list(queries)
    q = embedder.encode([queries[i] for i in qids], instruction=instruction)
    scores = q @ doc_vectors.T
    run = {}
    for row, qid in enumerate(qids):
        top = np.argsort(-scores[row])[:100]
        run[qid] = {doc_ids[j]: float(scores[row, j]) for j in top}
    evaluator = pytrec_eval.RelevanceEvaluator({k: v for k, v in qrels.items() if k in run}, {"ndcg_cut.10"})
    per_query = evaluator.evaluate(run)
    return float(np.mean([m["ndcg_cut_10"] for m in per_query.values()])), doc_vectors


def evaluate(embedder, label: str, scifact, corpus: int) -> dict:
    out = {}
    began = time.time()
    try:
        from ray_e5.evaluate.run import score_local_task  # mteb on the local folders, the paper's instructions
    except ImportError:
        score_local_task = None
    if score_local_task is not None:
        for flag, suffix in ((False, ""), (True, "_instruction")):
            out["stsb_spearman" + suffix] = score_local_task(embedder, DATA / "stsbenchmark", instructions=flag)
            out["scifact_ndcg10" + suffix] = score_local_task(embedder, DATA / "scifact", instructions=flag,
                                                              max_corpus=corpus, batch_size=16)
        out["scorer"] = "ray_e5.evaluate.score_local_task (mteb)"
    else:
        out["stsb_spearman"] = sts_spearman(embedder, None)
        out["stsb_spearman_instruction"] = sts_spearman(embedder, STS_INSTRUCTION)
        out["scifact_ndcg10"], docs = scifact_ndcg(embedder, None, scifact)
        out["scifact_ndcg10_instruction"], _ = scifact_ndcg(embedder, SCIFACT_INSTRUCTION, scifact, docs)
        out["scorer"] = "scipy + pytrec_eval"
    out["eval_seconds"] = round(time.time() - began, 1)
    print(f"{label:8s} " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) and k != "eval_seconds" else f"{k}={v}"
                                     for k, v in out.items()), flush=True)
    return out


def train_config(run_dir: str, max_time_s: float, max_length: int, batch_size: int, lr: float, epochs: int,
                 max_steps: int | None):
    from ray_e5.config import load_config

    root = Path(__file__).resolve().parents[1]
    overrides = [f"run_dir={run_dir}", f"model.max_length={max_length}", f"train.batch_size={batch_size}",
                 f"train.lr={lr}", f"train.epochs={epochs}", f"train.max_time_s={max_time_s}",
                 "train.synthetic=false", "train.resume=false"] + ([f"train.max_steps={max_steps}"] if max_steps else [])
    return load_config(root / "configs" / "quickstart.yaml", overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/quality")
    parser.add_argument("--skip-train", action="store_true", help="evaluate <run-dir>/embedder as it is")
    parser.add_argument("--skip-base", action="store_true")
    parser.add_argument("--max-time-s", type=float, default=840.0, help="training wall-time cap")
    parser.add_argument("--max-steps", type=int, default=None, help="training step cap (the lr schedule fits it)")
    parser.add_argument("--max-length", type=int, default=64, help="training max length (tokens)")
    parser.add_argument("--eval-max-length", type=int, default=128, help="max length when scoring (SciFact docs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--corpus", type=int, default=1000, help="SciFact corpus subsample size")
    args = parser.parse_args()

    import torch

    from ray_e5.model import Embedder

    torch.set_num_threads(os.cpu_count() or 1)
    results: dict = {"machine": f"{os.cpu_count()} CPU cores", "scifact_corpus_docs": args.corpus}
    if not args.skip_train:
        from ray_e5.train.run import train

        began = time.time()
        config = train_config(args.run_dir, args.max_time_s, args.max_length, args.batch_size, args.lr, args.epochs,
                              args.max_steps)
        train(config)
        results["train_seconds"] = round(time.time() - began, 1)
        results["train"] = json.loads((Path(args.run_dir) / "train" / "summary.json").read_text())
        results["train_config"] = config.train
    scifact = scifact_subsample(args.corpus)
    results["scifact_queries"] = len(scifact[0])
    if not args.skip_base:
        results["base"] = evaluate(Embedder.load("gemma3-270m", max_length=args.eval_max_length), "base", scifact,
                                   args.corpus)
    trained = Embedder.load(Path(args.run_dir) / "embedder", merge_lora=True, max_length=args.eval_max_length)
    results["trained"] = evaluate(trained, "trained", scifact, args.corpus)
    out = Path(args.run_dir) / "quality.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()
