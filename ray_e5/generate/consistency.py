"""Consistency filtering of synthetic rows: keep a pair a reference embedder agrees with.

A row is kept when a reference embedder (by default all-MiniLM-L6-v2; any model reference: the base model, a
teacher, a previous run's embedder) scores its positive above its hard negative and ranks the positive within the
top ``top_k`` of a pool of positives drawn from rows of the same kind, as the embedding literature filters
LLM-written pairs (Gecko's positive-in-top-k check, the margin check of hard-negative mining). What is dropped is
recorded, never deleted: ``synthetic/consistency.json`` maps each dropped row id to its reason and the training
reader skips those ids, so a change of settings re-filters the same rows.

sentence-transformers' ``mine_hard_negatives`` mines negatives from a corpus; none of the libraries we use
filters given (query, positive, negative) rows by agreement, hence this module (a few matrix products).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Callable, Sequence

import numpy as np

from ray_e5 import storage
from ray_e5.rundir import CONSISTENCY_FILE

NEGATIVE_ABOVE = "consistency_negative_above_positive"
NOT_IN_TOP_K = "consistency_positive_not_in_top_k"


def judge(rows: Sequence[dict], embed: Callable[[list[str]], np.ndarray], top_k: int, pool: int,
          seed: int = 0) -> dict[str, str]:
    """The ids of ``rows`` (dicts with id, kind, query, positive, negative) to drop, with their reasons.

    ``embed`` maps texts to unit vectors. A row's pool is its own positive and up to ``pool - 1`` positives of other
    rows of its kind (sampled with ``seed``); with fewer than ``top_k + 1`` candidates the rank check passes."""
    if not rows:
        return {}
    texts: list[str] = []
    index: dict[str, int] = {}
    for row in rows:
        for text in (row["query"], row["positive"], row.get("negative") or ""):
            if text and text not in index:
                index[text] = len(texts)
                texts.append(text)
    vectors = embed(texts)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_kind[row["kind"]].append(i)
    rng = random.Random(seed)
    dropped: dict[str, str] = {}
    for members in by_kind.values():
        positives = np.stack([vectors[index[rows[i]["positive"]]] for i in members])
        for slot, i in enumerate(members):
            row = rows[i]
            query = vectors[index[row["query"]]]
            own = float(query @ vectors[index[row["positive"]]])
            negative = row.get("negative") or ""
            if negative and float(query @ vectors[index[negative]]) >= own:
                dropped[row["id"]] = NEGATIVE_ABOVE
                continue
            # O(pool) per row, not O(rows of the kind): a kind may hold hundreds of thousands of rows
            drawn = rng.sample(range(len(members)), min(len(members), pool))
            others = [s for s in drawn if s != slot and rows[members[s]]["positive"] != row["positive"]][:pool - 1]
            if len(others) < top_k:
                continue
            above = int(np.sum(positives[others] @ query > own))
            if above >= top_k:
                dropped[row["id"]] = NOT_IN_TOP_K
    return dropped


def quality(rows: Sequence[dict], dropped: dict[str, str]) -> dict[str, dict]:
    """Per kind: rows, mean words of query and positive, exact duplicate positives, and the consistency drops."""
    out: dict[str, dict] = {}
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_kind[row["kind"]].append(row)
    for kind, members in sorted(by_kind.items()):
        reasons = Counter(dropped[r["id"]] for r in members if r["id"] in dropped)
        positives = Counter(r["positive"].strip().lower() for r in members)
        out[kind] = {
            "rows": len(members),
            "query_words": round(float(np.mean([len(r["query"].split()) for r in members])), 1),
            "positive_words": round(float(np.mean([len(r["positive"].split()) for r in members])), 1),
            "duplicate_positives": sum(c - 1 for c in positives.values() if c > 1),
            "consistency_dropped": dict(reasons),
            "consistency_kept_share": round(1 - sum(reasons.values()) / len(members), 3),
        }
    return out


def score_rows(rows: list[dict], model: str, top_k: int, pool: int, seed: int, threads: int) -> dict[str, str]:
    """:func:`judge` with ``model`` loaded where this runs (a Ray task: the rows travel through the object store)."""
    import torch

    from ray_e5.model.embedder import Embedder

    torch.set_num_threads(max(1, threads))
    embedder = Embedder.load(model)
    return judge(rows, lambda texts: embedder.encode(texts, batch_size=64), top_k, pool, seed)


def write_dropped(synthetic_dir: str, dropped: dict[str, str], settings: dict) -> None:
    """Record the drops (read back by :func:`ray_e5.data.sources.consistency_dropped`)."""
    storage.write_json(storage.join(synthetic_dir, CONSISTENCY_FILE), {"settings": settings, "dropped": dropped})
