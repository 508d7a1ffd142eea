"""Base Gemma 3 270M cut to its first N layers (``model.num_layers``), mean-pooled, scored on STS-B dev and SICK
test (Spearman x 100 of cosine against the gold score, what mteb reports for STS): which depth to start from.

    python bench/probe_depth.py [--layers 10 12 14 16 18] [--pairs 400]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
SETS = {"STS-B dev": DATA / "stsbenchmark" / "dev.jsonl", "SICK test": DATA / "sick" / "test.jsonl"}


def pairs(path: Path, limit: int) -> tuple[list[str], list[str], list[float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:limit]]
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [float(r["score"]) for r in rows]


def main() -> None:
    import numpy as np
    from scipy.stats import spearmanr

    from ray_e5.model import Embedder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 12, 14, 16, 18])
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"the shared datasets are not at {DATA}: see ../shared/data/README.md")
    data = {name: pairs(path, args.pairs) for name, path in SETS.items()}
    print(f"{'layers':>6s} " + " ".join(f"{name:>10s}" for name in data) + "   seconds")
    for layers in args.layers:
        start = time.time()
        embedder = Embedder.load("gemma3-270m", pooling="mean", max_length=128, num_layers=layers)
        scores = []
        for left, right, gold in data.values():
            a, b = embedder.encode(left), embedder.encode(right)
            scores.append(100 * spearmanr(np.sum(a * b, axis=1), gold).statistic)
        print(f"{layers:6d} " + " ".join(f"{s:10.2f}" for s in scores) + f"   {time.time() - start:7.1f}", flush=True)


if __name__ == "__main__":
    main()
