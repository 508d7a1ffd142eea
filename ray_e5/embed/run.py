"""`ray-e5 embed --input URI --output URI`: a corpus embedded by an autoscaling pool of Ray Data actors, resumable.

The driver cuts the input into blocks whose bounds depend only on the files (:mod:`ray_e5.embed.units`), lists the
shards already in ``output`` and hands the others to Ray Data: one dataset row per block, mapped by an autoscaling
``ActorPoolStrategy(min_size=1, max_size=N)`` of :class:`BlockEmbedder` actors that each hold the Embedder (any
reference ``Embedder.load`` takes). An actor reads its block, rejects bad rows (counted, written to ``_rejects/``
with the reason), embeds the rest in token-budgeted batches sorted by length (padding is paid per batch, so texts of
like length go together, as :mod:`ray_e5.serve.batching` forms its batches by tokens) and writes the block's shard
whole: Parquet ``id`` (string), ``embedding`` (float32 list), the model's reference and dimension in the schema
metadata. A shard is written under a temporary name and renamed (locally; an object store's PUT is already all or
nothing), and written last, after its rejects: its presence means the block is done. A rerun into the same output
(after a crash, a SIGKILL, a lost node) skips those blocks, so no block is computed twice and no id written twice.

Ray Data gives what a hand-written loop would have to re-implement: streaming (blocks are read while others
embed), the actor pool that grows with the backlog and the cluster (GPU nodes included: ``num_gpus`` per actor),
retries of a block whose actor died, and the output iterator the progress bar counts from.

Layout of ``output``::

    part-<digest of file, size, range>.parquet   one shard per input block: id, embedding
    _rejects/part-<same>.parquet                 the block's rejected rows: file, row, id, reason (if any)
    _embed.json                                  what the shards are (model, dimension, columns, instruction)
    _summary.json                                the last run's counts

Files and folders starting with ``_`` or ``.`` are skipped by Parquet dataset readers, so ``pq.read_table(output)``
and ``ray.data.read_parquet(output)`` read exactly the embeddings.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from ray_e5 import storage as runs
from ray_e5.embed.config import EmbedSettings
from ray_e5.embed.shards import (META_DIMENSION, META_MODEL, REJECTS, SUMMARY, block_rows, check_columns,
                                  check_manifest, done_shards, max_actors, shard_rows, truncate, write_whole)
from ray_e5.embed.units import Block, plan
from ray_e5.settings import ConfigError

def token_batches(lengths: list[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices in batches of like length: sorted longest first, each batch as large as fits ``batch_tokens`` padded
    tokens (its longest text times its size) and ``max_batch_size`` texts; a text over the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_batch_size and \
                lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class BlockEmbedder:
    """A Ray Data actor: loads the Embedder once, then reads, embeds and writes whole blocks (one dataset row each).

    The weights' dtype is ``embed.dtype`` (``auto``: bf16 where this node runs it natively, a bf16 GPU or an
    AVX512-BF16/AMX CPU); the forward pools and normalises in float32, as :meth:`Embedder.forward` always does. With
    ``num_gpus`` the model moves to the GPU; on a machine without CUDA the same path runs on the CPU."""

    def __init__(self, settings: dict, model: str, output: str, threads: int = 1):
        import torch

        from ray_e5.model.embedder import Embedder

        self.s = EmbedSettings.model_validate(settings)
        torch.set_num_threads(max(1, threads))
        from ray_e5.model.precision import inference_dtype

        overrides: dict[str, Any] = {"pooling": self.s.pooling} if self.s.pooling else {}
        overrides["dtype"] = inference_dtype(self.s.dtype)
        self.embedder = Embedder.load(runs.local_copy(model) if "://" in model else model, **overrides)
        if self.s.num_gpus > 0 and torch.cuda.is_available():
            self.embedder.to("cuda")
        self.model, self.output = model, output
        self.dimension = self.s.dimensions or self.embedder.dimension
        if self.dimension > self.embedder.dimension:
            raise ValueError(f"embed.dimensions={self.dimension} is above {model!r}'s dimension "
                             f"{self.embedder.dimension}")

    def metadata(self, block: Block) -> dict[bytes, bytes]:
        return {META_MODEL: self.model.encode(), META_DIMENSION: str(self.dimension).encode(),
                b"ray_e5.base_model": self.embedder.name.encode(),
                b"ray_e5.model_dimension": str(self.embedder.dimension).encode(),
                b"ray_e5.instruction": (self.s.instruction or "").encode(),
                b"ray_e5.normalized": str(bool(self.embedder.settings.normalize or self.s.dimensions)).lower().encode(),
                b"ray_e5.block": json.dumps(block.to_dict()).encode()}

    def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors of ``texts`` in input order, float32, computed in token-budgeted, length-sorted batches."""
        import torch

        from ray_e5.model.tokenize import pad

        ids = self.embedder.token_ids(texts, self.s.instruction)
        out = np.zeros((len(ids), self.embedder.dimension), dtype=np.float32)
        device = self.embedder.device
        with torch.inference_mode():
            for chunk in token_batches([len(x) for x in ids], self.s.batch_tokens, self.s.max_batch_size):
                batch = {k: v.to(device) for k, v in pad([ids[i] for i in chunk], self.embedder.tokenizer.pad_token_id).items()}
                out[chunk] = self.embedder(**batch).float().cpu().numpy()
        return truncate(out, self.s.dimensions)

    def run_block(self, block: Block) -> dict:
        began = time.time()
        shard = runs.join(self.output, block.name + ".parquet")
        if runs.exists(shard):  # a retried task whose first attempt finished the block
            return {"block": block.name, "written": 0, "rejected": 0, "skipped": shard_rows(shard), "seconds": 0.0}
        ids, texts, rejects = block_rows(block, self.s.text_column, self.s.id_column)
        if rejects:
            write_whole(runs.join(self.output, REJECTS, block.name + ".parquet"), pa.Table.from_pylist(
                rejects, schema=pa.schema([("file", pa.string()), ("row", pa.int64()), ("id", pa.string()),
                                           ("reason", pa.string())])))
        vectors = self.embed(texts) if texts else np.zeros((0, self.dimension), dtype=np.float32)
        schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))], metadata=self.metadata(block))
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        offsets = pa.array(np.arange(0, len(ids) + 1, dtype=np.int32) * self.dimension, type=pa.int32())
        table = pa.table([pa.array(ids, type=pa.string()), pa.ListArray.from_arrays(offsets, flat)], schema=schema)
        write_whole(shard, table)  # last: its presence marks the block done
        return {"block": block.name, "written": len(ids), "rejected": len(rejects), "skipped": 0,
                "seconds": round(time.time() - began, 3)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys = ("uri", "format", "start", "stop", "size")
        results = [self.run_block(Block(*(b[k] if k in ("uri", "format") else int(b[k]) for k in keys)))
                   for b in ({k: batch[k][i] for k in keys} for i in range(len(batch["uri"])))]
        return {k: [r[k] for r in results] for k in results[0]} if results else {}


# ---- the driver ----------------------------------------------------------------------------------------------
def _progress(total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc="[ray-e5 embed]", file=sys.stderr, smoothing=0.1,
                dynamic_ncols=True, disable=None if not os.environ.get("RAY_E5_PROGRESS") else False)


def embed_corpus(config, log=print) -> dict:
    """Embed ``config.embed.input`` into ``config.embed.output``; returns the run's summary (rows written, rejected,
    skipped as already done, seconds, rows/s)."""
    s: EmbedSettings = config.embed
    if not s.input or not s.output:
        raise ConfigError("embed: both embed.input (--input) and embed.output (--output) are needed")
    model = s.model or config.model.name
    began = time.time()
    blocks = plan(runs.absolute(s.input), s.format, s.block_rows, s.block_bytes)
    check_columns(blocks[0], s.text_column, s.id_column)
    output = runs.absolute(s.output)
    runs.check_access(output, "embed.output", must_exist=False)
    manifest = {"model": model, "engine": s.engine, "text_column": s.text_column, "id_column": s.id_column,
                "dimensions": s.dimensions, "instruction": s.instruction, "pooling": s.pooling,
                "input": runs.absolute(s.input), "blocks": len(blocks)}
    check_manifest(output, manifest)
    done = done_shards(output)
    todo = [b for b in blocks if b.name not in done]
    finished = [b for b in blocks if b.name in done]
    with ThreadPoolExecutor(8) as pool:
        skipped = sum(pool.map(shard_rows, [runs.join(output, b.name + ".parquet") for b in finished]))
    log(f"[ray-e5 embed] {len(blocks)} block(s) of {s.input}: {len(finished)} already done ({skipped} rows), "
        f"{len(todo)} to embed with {model} into {output}")
    written = rejected = 0
    if todo:
        if s.engine == "vllm":
            from ray_e5.embed.vllm import embed_with_vllm

            counts = embed_with_vllm(config, model, output, todo, log)
            written, rejected = counts["written"], counts["rejected"]
        else:
            written, rejected, extra = _embed_with_actors(config, s, model, output, todo)
            skipped += extra
    seconds = time.time() - began
    summary = {"rows_written": written, "rows_rejected": rejected, "rows_skipped": skipped,
               "blocks": len(blocks), "blocks_done_before": len(finished), "seconds": round(seconds, 1),
               "rows_per_s": round(written / seconds, 1) if seconds > 0 else None, "model": model, "output": output}
    runs.write_json(runs.join(output, SUMMARY), summary)
    log(f"[ray-e5 embed] done: {written} rows written, {rejected} rejected (see {runs.join(output, REJECTS)}), "
        f"{skipped} skipped as already done, in {seconds:.1f} s ({summary['rows_per_s']} rows/s)")
    return summary


def _embed_with_actors(config, s: EmbedSettings, model: str, output: str, todo: list[Block]) -> tuple[int, int, int]:
    import ray.data

    from ray_e5.cluster import connect

    connect(config.ray_address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # its bar counts blocks; ours counts rows
    n = max_actors(s, len(todo))
    dataset = ray.data.from_items([b.to_dict() for b in todo], override_num_blocks=len(todo))
    out = dataset.map_batches(
        BlockEmbedder, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs={"settings": s.model_dump(), "model": model, "output": output,
                               "threads": max(1, int(s.cpus_per_actor))},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n), num_cpus=s.cpus_per_actor,
        num_gpus=s.num_gpus or None)
    parquet_total = all(b.format == "parquet" for b in todo)
    bar = _progress(sum(b.stop - b.start for b in todo) if parquet_total else None)
    written = rejected = skipped = 0
    try:
        for row in out.iter_rows():
            written += int(row["written"])
            rejected += int(row["rejected"])
            skipped += int(row["skipped"])
            bar.update(int(row["written"]) + int(row["rejected"]) + int(row["skipped"]))
    finally:
        bar.close()
    return written, rejected, skipped
