"""``embed.engine: vllm``: the corpus embedded by vLLM's pooling runner through ``ray.data.llm`` (GPU nodes).

The model is a merged ``ray-e5 export`` directory; its pooling and normalisation (``1_Pooling/config.json``,
``modules.json``) are handed to vLLM as ``override_pooler_config`` (the key the installed ray.data.llm stage turns
into a ``vllm.config.PoolerConfig``), and the rows are tokenised here as the Embedder tokenises them (instruction
template, truncation, EOS for last-token pooling: :class:`ray_e5.serve.vllm_backend.MergedModelText`), so vLLM
pools the same tokens the Embedder would. ray.data.llm's own chat-template, tokenize and detokenize stages are off.

Resume works as with the actors: each block's rows carry the block's name, the processor's output is grouped by
block and each group written whole as that block's shard (and its rejects), so the layout of ``output`` and a
rerun's skipping are the same whichever engine wrote it.
"""

from __future__ import annotations

from typing import Any

BLOCK_COLUMN = "__ray_e5_block"


def vllm_processor_config(model_dir: str, settings, max_model_len: int, pooling: str, normalize: bool,
                          max_actors: int):
    """The ``ray.data.llm`` vLLM engine processor config: task ``embed``, an autoscaling pool of 1..``max_actors``
    engines of ``num_gpus`` (at least 1) GPUs, bf16 weights; our token ids go in as ``tokenized_prompt``."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from ray_e5.serve.vllm_backend import VLLM_POOLING

    return vLLMEngineProcessorConfig(
        model_source=model_dir, task_type="embed", concurrency=(1, max_actors), batch_size=settings.max_batch_size,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        engine_kwargs={"tensor_parallel_size": max(1, int(settings.num_gpus)), "dtype": "bfloat16",
                       "max_model_len": max_model_len, "max_num_batched_tokens": max(settings.batch_tokens, max_model_len),
                       "override_pooler_config": {"pooling_type": VLLM_POOLING[pooling], "normalize": normalize}})


def vllm_preprocess(text, instruction: str | None):
    """Row (id, text, block) -> the engine stage's input: ``tokenized_prompt`` (our token ids), the row kept."""

    def preprocess(row: dict) -> dict:
        ids = text.token_ids([row["text"]], instruction)[0]
        return {"id": row["id"], BLOCK_COLUMN: row[BLOCK_COLUMN], "tokenized_prompt": ids}

    return preprocess


def vllm_postprocess(row: dict) -> dict:
    return {"id": row["id"], BLOCK_COLUMN: row[BLOCK_COLUMN], "embedding": row["embeddings"]}


def embed_with_vllm(config, model: str, output: str, todo: list, log=print) -> dict[str, Any]:
    """Embed the blocks ``todo`` with vLLM; returns the rows written and rejected."""
    import numpy as np
    import pyarrow as pa
    import ray.data
    from ray.data.llm import build_processor

    from ray_e5 import storage as runs
    from ray_e5.cluster import connect
    from ray_e5.embed.shards import REJECTS, block_rows, max_actors, shard_rows, truncate, write_whole
    from ray_e5.serve.vllm_backend import MergedModelText

    s = config.embed
    local = runs.local_copy(model) if "://" in model else model
    text = MergedModelText.load(local)
    connect(config.ray_address)
    by_name = {b.name: b for b in todo}
    counts = {"written": 0, "rejected": 0}

    def read(row: dict) -> list[dict]:
        block = by_name[row["name"]]
        ids, texts, rejects = block_rows(block, s.text_column, s.id_column)
        if rejects:
            write_whole(runs.join(output, REJECTS, block.name + ".parquet"), pa.Table.from_pylist(rejects))
        return [{"id": i, "text": t, BLOCK_COLUMN: block.name} for i, t in zip(ids, texts)]

    dimension = s.dimensions or text.dimension

    def write(group):
        name = str(group[BLOCK_COLUMN][0])
        vectors = truncate(np.stack([np.asarray(v, dtype=np.float32) for v in group["embedding"]]), s.dimensions)
        meta = {b"ray_e5.model": model.encode(), b"ray_e5.dimension": str(dimension).encode(),
                b"ray_e5.engine": b"vllm"}
        table = pa.table({"id": pa.array([str(i) for i in group["id"]], type=pa.string()),
                          "embedding": pa.array(list(vectors), type=pa.list_(pa.float32()))}).replace_schema_metadata(meta)
        write_whole(runs.join(output, name + ".parquet"), table)
        return {"block": [name], "written": [len(table)]}

    processor = build_processor(
        vllm_processor_config(local, s, text.settings.max_length, text.settings.pooling, text.settings.normalize,
                              max_actors(s, len(todo))),
        preprocess=vllm_preprocess(text, s.instruction), postprocess=vllm_postprocess)
    rows = ray.data.from_items([{"name": b.name} for b in todo], override_num_blocks=len(todo)).flat_map(read)
    done = processor(rows).groupby(BLOCK_COLUMN).map_groups(write, batch_format="numpy")
    for row in done.iter_rows():
        counts["written"] += int(row["written"])
    for block in todo:  # the rejects were written by the read tasks: counted from their files
        uri = runs.join(output, REJECTS, block.name + ".parquet")
        counts["rejected"] += shard_rows(uri) if runs.exists(uri) else 0
    log(f"[ray-e5 embed] vLLM wrote {counts['written']} rows in {len(todo)} block(s)")
    return counts
