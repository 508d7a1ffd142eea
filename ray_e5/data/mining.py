"""Hard negatives mined with an embedder, feeding the training plan (``train.mine``).

For each valid row of a mined source that has no negative (every valid row with ``replace``), the documents of its
group (the source's rows of the same kind: their positives and existing negatives) are ranked by cosine similarity
to the row's query, as the embedder sees them (the query in its instruction template, documents as they are, as
training embeds them). The negative is the best-ranked document (``sampling: top``) or a seeded random one of the
top ``top_k`` (``sampling: random``) that

- is not the row's positive, nor any other positive of the same query (an STS sentence paired several times), nor
  the query itself; ranks ``skip_top`` and below (the very top is often an unlabeled positive);
- scores at most ``(1 - relative_margin)`` times the positive's score (NV-Retriever's "TopK-PercPos" filter, the
  ``relative_margin`` of sentence-transformers' ``mine_hard_negatives``): a candidate nearly as close as the
  positive is more likely a false negative than a hard one.

A row for which no candidate passes keeps what it had, and is counted. The texts are embedded once (deduplicated)
by Ray Data actors that each load the embedder (the run's base model by default, or ``train.mine.model``: an
embedder directory or URI, e.g. a previous run's, the "current model" of ANCE-style mining); the exact search runs
as one Ray task per group. The mined rows are cached in the run directory under a digest of the rows, the model and
the settings, so a resumed or repeated run does not mine again and plans the same batches.

Why by hand: sentence-transformers' ``mine_hard_negatives`` and FlagEmbedding's ``hn_mine`` embed in one process
with their own model classes and return their own dataset layouts; here the embedding must be spread over the
cluster with the run's own Embedder (pooling, instruction template, LoRA) and the rows must keep the contract's
columns and counted problems. The search is exact (a matrix product per group, in chunks): groups are a source's
rows of one kind, tens of thousands of documents at most in the recipes; an approximate index is left for larger.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from ray_e5 import storage
from ray_e5.digest import digest

SEARCH_CHUNK = 1024  # queries scored per matrix product


class _Encoder:
    """A Ray Data actor: loads the mining embedder once, embeds batches of (text, task) as training embeds them."""

    def __init__(self, model: dict[str, Any], threads: int):
        import torch

        from ray_e5.model.embedder import Embedder

        torch.set_num_threads(max(1, threads))
        overrides = model.get("overrides") or {}
        self.embedder = Embedder.load(storage.local_copy(model["reference"]), **overrides)
        self.template = self.embedder.settings.instruction_template

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray_e5.data.format import format_queries

        texts = format_queries([str(t) for t in batch["text"]], [str(t) for t in batch["task"]], self.template)
        return {"id": batch["id"], "vector": self.embedder.encode(texts, batch_size=len(texts))}


def embed(items: list[tuple[str, str]], model: dict[str, Any], settings) -> np.ndarray:
    """Unit vectors of ``(text, task)`` items (task "" for a document), embedded by ``settings.num_workers`` Ray
    Data actors (1 when unset); the items go in sorted by length, so each batch pads little."""
    import ray.data

    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    records = [{"id": i, "text": items[i][0], "task": items[i][1]} for i in order]
    workers, cpus = settings.num_workers or 1, settings.cpus_per_worker or 1.0
    blocks = max(1, min(len(records) // settings.batch_size, 32 * workers))
    dataset = ray.data.from_items(records, override_num_blocks=blocks)
    dataset.context.enable_progress_bars = False
    threads = int(cpus) or 1
    out = dataset.map_batches(_Encoder, fn_constructor_kwargs={"model": model, "threads": threads},
                              compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
                              batch_size=settings.batch_size, batch_format="numpy")
    vectors: np.ndarray | None = None
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        if vectors is None:
            vectors = np.zeros((len(items), batch["vector"].shape[1]), dtype=np.float32)
        vectors[batch["id"]] = batch["vector"]
    if vectors is None:
        raise RuntimeError("mining embedded nothing: the Ray Data encoder returned no batch")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def search(queries: np.ndarray, positives: np.ndarray, corpus: np.ndarray, excluded: list[list[int]],
           top_k: int, skip_top: int, relative_margin: float, sampling: str, seed: int) -> tuple[list[int], dict]:
    """The corpus index chosen as each query's negative (-1: none passed), and the scores' summary."""
    rng = np.random.default_rng(seed)
    n, m = len(queries), len(corpus)
    chosen = [-1] * n
    pos_scores = np.einsum("ij,ij->i", queries, positives)
    neg_scores: list[float] = []
    for start in range(0, n, SEARCH_CHUNK):
        scores = queries[start:start + SEARCH_CHUNK] @ corpus.T
        for r in range(scores.shape[0]):
            i = start + r
            skip = set(excluded[i])
            width = min(m, skip_top + top_k + len(skip))
            top = np.argpartition(-scores[r], width - 1)[:width] if width < m else np.arange(m)
            top = top[np.argsort(-scores[r][top], kind="stable")]
            ranked = [int(j) for j in top if int(j) not in skip][skip_top:skip_top + top_k]
            limit = pos_scores[i] - relative_margin * abs(pos_scores[i])
            passing = [j for j in ranked if scores[r, j] <= limit]
            if passing:
                chosen[i] = passing[0] if sampling == "top" else passing[int(rng.integers(len(passing)))]
                neg_scores.append(float(scores[r, chosen[i]]))
    summary = {"mean_positive_score": round(float(pos_scores.mean()), 4) if n else None,
               "mean_negative_score": round(float(np.mean(neg_scores)), 4) if neg_scores else None}
    return chosen, summary


def _groups(cols: dict[str, list], replace: bool) -> dict[str, dict]:
    """Per kind: the rows to mine, the corpus (unique documents of the kind's valid rows, in order) and each
    query's positives."""
    groups: dict[str, dict] = {}
    for i, kind in enumerate(cols["kind"]):
        if cols["problem"][i]:
            continue
        g = groups.setdefault(kind, {"rows": [], "docs": {}, "positives": {}})
        for doc in (cols["positive"][i], cols["negative"][i]):
            if doc:
                g["docs"].setdefault(doc, len(g["docs"]))
        g["positives"].setdefault(cols["query"][i], set()).add(cols["positive"][i])
        if replace or not cols["negative"][i]:
            g["rows"].append(i)
    return groups


def mine_table(rows: pa.Table, model: dict[str, Any], settings, seed: int = 0) -> tuple[pa.Table, dict]:
    """``rows`` (ROW_COLUMNS) with mined negatives, and what was done: rows considered, mined, left as they were."""
    import ray

    cols = {c: rows.column(c).to_pylist() for c in ("kind", "task", "query", "positive", "negative", "problem")}
    groups = {k: g for k, g in _groups(cols, settings.replace).items() if g["rows"] and len(g["docs"]) > 1}
    items: dict[tuple[str, str], int] = {}
    for g in groups.values():
        for i in g["rows"]:
            items.setdefault((cols["query"][i], cols["task"][i]), len(items))
            items.setdefault((cols["positive"][i], ""), len(items))
        for doc in g["docs"]:
            items.setdefault((doc, ""), len(items))
    stats: dict[str, Any] = {"considered": sum(len(g["rows"]) for g in groups.values()), "mined": 0,
                             "replaced": 0, "no_candidate": 0, "texts_embedded": len(items), "kinds": {}}
    if not items:
        return rows, stats
    vectors = embed(list(items), model, settings)
    search_task = ray.remote(num_cpus=1)(search)
    pending = {}
    for kind, g in groups.items():
        doc_index = g["docs"]
        q = vectors[[items[(cols["query"][i], cols["task"][i])] for i in g["rows"]]]
        p = vectors[[items[(cols["positive"][i], "")] for i in g["rows"]]]
        c = vectors[[items[(d, "")] for d in doc_index]]
        excluded = [sorted({doc_index[x] for x in g["positives"][cols["query"][i]] | {cols["query"][i]}
                            if x in doc_index}) for i in g["rows"]]
        pending[kind] = search_task.remote(q, p, c, excluded, settings.top_k, settings.skip_top,
                                           settings.relative_margin, settings.sampling, seed)
    negatives = cols["negative"]
    for kind, ref in pending.items():
        g = groups[kind]
        docs = list(g["docs"])  # the corpus order the search indexed
        chosen, summary = ray.get(ref)
        mined = 0
        for i, j in zip(g["rows"], chosen):
            if j < 0:
                continue
            stats["replaced"] += bool(negatives[i])
            negatives[i] = docs[j]
            mined += 1
        stats["mined"] += mined
        stats["no_candidate"] += len(g["rows"]) - mined
        stats["kinds"][kind] = {"considered": len(g["rows"]), "mined": mined, "corpus": len(docs), **summary}
    index = rows.schema.get_field_index("negative")
    return rows.set_column(index, "negative", pa.array(negatives, type=pa.string())), stats


def mine_sources(tables: dict[str, pa.Table], model: dict[str, Any], settings, cache_dir: str,
                 seed: int = 0, log=print) -> dict[str, pa.Table]:
    """Mine each named source's rows (``tables``: name -> ROW_COLUMNS table), reusing the run directory's cache;
    returns name -> mined rows. Raises when mining was asked for and found no negative for any row."""
    import pyarrow.parquet as pq

    out: dict[str, pa.Table] = {}
    total_considered = total_mined = 0
    for name, rows in tables.items():
        key = digest({"rows": [rows.column(c).to_pylist() for c in rows.column_names], "model": model,
                      "settings": settings.model_dump(exclude={"sources", "num_workers", "cpus_per_worker"}),
                      "seed": seed})
        uri = storage.join(cache_dir, f"{name}-{key}.parquet")
        done = uri.removesuffix(".parquet") + ".json"  # written last: its presence means the Parquet is whole
        fs, path = storage.resolve(uri)
        if storage.exists(done):
            out[name] = pq.read_table(path, filesystem=fs)
            meta = storage.read_json(done)
            log(f"[ray-e5 train] mined source {name}: {meta['mined']} of {meta['considered']} rows have a mined "
                f"negative (from {uri})")
        else:
            began = time.time()
            out[name], stats = mine_table(rows, model, settings, seed)
            stats["seconds"] = round(time.time() - began, 1)
            storage.makedirs(cache_dir)
            pq.write_table(out[name], path, filesystem=fs)
            storage.write_json(done, stats)
            meta = stats
            log(f"[ray-e5 train] mined source {name}: {stats['mined']} of {stats['considered']} rows got a hard "
                f"negative ({stats['no_candidate']} had no candidate below the margin, {stats['replaced']} "
                f"replaced); {stats['texts_embedded']} texts embedded in {stats['seconds']:.0f} s")
        total_considered += meta["considered"]
        total_mined += meta["mined"]
    if total_considered and not total_mined:
        raise RuntimeError(f"train.mine: no hard negative found for any of {total_considered} rows of "
                           f"{sorted(tables)}; lower train.mine.relative_margin or raise train.mine.top_k")
    return out
