"""Base Gemma 3 270M cut to its first N layers (``model.num_layers``), mean-pooled, scored by mteb on STS-B dev and
SICK test (cosine Spearman x 100, as ``ray-e5 evaluate`` reports them): which depth to start from.

    python bench/probe_depth.py [--layers 10 12 14 16 18] [--pairs 400]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
SETS = {"STS-B dev": ("stsbenchmark", "dev"), "SICK test": ("sick", "test")}


def main() -> None:
    from ray_e5.evaluate.run import score_local_task
    from ray_e5.model import Embedder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 12, 14, 16, 18])
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"the shared datasets are not at {DATA}: see ../shared/data/README.md")
    print(f"{'layers':>6s} " + " ".join(f"{name:>10s}" for name in SETS) + "   seconds")
    for layers in args.layers:
        start = time.time()
        embedder = Embedder.load("gemma3-270m", pooling="mean", max_length=128, num_layers=layers)
        scores = [100 * score_local_task(embedder, DATA / folder, split=split, instructions=False,
                                         max_samples=args.pairs) for folder, split in SETS.values()]
        print(f"{layers:6d} " + " ".join(f"{s:10.2f}" for s in scores) + f"   {time.time() - start:7.1f}", flush=True)


if __name__ == "__main__":
    main()
