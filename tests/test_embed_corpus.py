"""`ray-e5 embed --input URI --output URI`: a corpus embedded by Ray Data actors into resumable Parquet shards.

Real parts throughout: the session's local Ray cluster, the tiny decoder as the model, real JSONL and Parquet
files; the vectors are checked against ``Embedder.encode`` of the same texts, and the resume test kills the driver
with SIGKILL mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_e5.config import RayE5Config, load_config
from ray_e5.model import Embedder
from ray_e5.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "cell protein gene binding tumour receptor signal pathway mouse human dose trial effect".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 24)))) for _ in range(n)]


def _write_jsonl(path: Path, n: int, bad: bool = True) -> dict[str, str]:
    texts = _texts(n)
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
        if bad:
            f.write(json.dumps({"id": None, "text": "an id-less row"}) + "\n")
            f.write(json.dumps({"id": "bad-text", "text": 42}) + "\n")
            f.write(json.dumps({"text": "no id key"}) + "\n")
            f.write(json.dumps({"id": "null-text", "text": None}) + "\n")
            f.write("this line is not JSON\n")
    return {f"d{i}": t for i, t in enumerate(texts)}


def _config(tmp_path: Path, **embed) -> RayE5Config:
    """fp32 weights unless a test says otherwise: these tests compare with Embedder.encode's fp32 vectors exactly."""
    embed.setdefault("dtype", "fp32")
    return load_config(None, [f"run_dir={tmp_path / 'run'}"] + [f"embed.{k}={v}" for k, v in embed.items()])


def _read(output: Path) -> pa.Table:
    return pq.read_table(str(output))  # _embed.json, _summary.json, _rejects/ are skipped by the dataset reader


def _check_vectors(table: pa.Table, expected: dict[str, str], embedder: Embedder, dimensions: int | None = None):
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(expected) > 0, "every id exactly once"
    assert set(ids) == set(expected)
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    want = embedder.encode([expected[i] for i in ids])
    if dimensions:
        want = want[:, :dimensions]
        want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert got.shape == want.shape
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.9999, f"lowest cosine to Embedder.encode: {cos.min()}"
    return got


@pytest.fixture(scope="module")
def tiny(tiny_decoder_dir) -> Embedder:
    return Embedder.load(str(tiny_decoder_dir))


@pytest.mark.slow
def test_jsonl_is_embedded_exactly_with_rejects_counted_and_a_rerun_skips(ray_cluster, tiny_decoder_dir, tiny, tmp_path):
    from ray_e5.embed.run import embed_corpus

    expected = _write_jsonl(tmp_path / "corpus.jsonl", 400)
    out = tmp_path / "out"
    config = _config(tmp_path, input=tmp_path / "corpus.jsonl", output=out,
                     model=tiny_decoder_dir, block_bytes=4000, max_actors=2)
    summary = embed_corpus(config)
    assert summary["rows_written"] == 400 and summary["rows_rejected"] == 5 and summary["rows_skipped"] == 0
    assert summary["blocks"] > 3  # several blocks, so the line-split rule between blocks is exercised
    table = _read(out)
    _check_vectors(table, expected, tiny)
    meta = pq.read_schema(str(next(out.glob("part-*.parquet")))).metadata
    assert meta[b"ray_e5.model"].decode() == str(tiny_decoder_dir)
    assert int(meta[b"ray_e5.dimension"]) == tiny.dimension
    rejects = pq.read_table(str(out / "_rejects")).to_pylist()
    reasons = sorted(r["reason"] for r in rejects)
    assert len(rejects) == 5
    assert sum("missing or null id" in r for r in reasons) == 2 and sum("not a JSON object" in r for r in reasons) == 1
    assert any("int, not a string" in r for r in reasons) and any("missing or null text" in r for r in reasons)
    assert json.loads((out / "_summary.json").read_text())["rows_written"] == 400

    again = embed_corpus(config)  # everything is there: nothing is recomputed
    assert again["rows_written"] == 0 and again["rows_skipped"] == 400 and again["blocks_done_before"] == summary["blocks"]
    assert _read(out).num_rows == 400


def test_parquet_with_custom_columns_and_matryoshka_dimensions(ray_cluster, tiny_decoder_dir, tiny, tmp_path):
    from ray_e5.embed.run import embed_corpus

    texts = _texts(300, seed=1)
    table = pa.table({"doc_id": list(range(300)), "body": texts, "other": ["x"] * 300})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=70)  # blocks cross row groups
    out = tmp_path / "out"
    config = _config(tmp_path, input=tmp_path / "corpus.parquet", output=out, model=tiny_decoder_dir,
                     text_column="body", id_column="doc_id", dimensions=16, block_rows=128)
    summary = embed_corpus(config)
    assert summary["rows_written"] == 300 and summary["rows_rejected"] == 0 and summary["blocks"] == 3
    result = _read(out)
    got = _check_vectors(result, {str(i): t for i, t in enumerate(texts)}, tiny, dimensions=16)
    assert got.shape[1] == 16 < tiny.dimension
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # re-normalised after the cut
    meta = pq.read_schema(str(next(out.glob("part-*.parquet")))).metadata
    assert meta[b"ray_e5.dimension"] == b"16" and int(meta[b"ray_e5.model_dimension"]) == tiny.dimension


def test_a_bad_text_column_is_refused_naming_the_columns_found(tmp_path, tiny_decoder_dir, capsys):
    from ray_e5.cli import main

    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "c.parquet")
    rc = main(["embed", "--input", str(tmp_path / "c.parquet"), "--output", str(tmp_path / "out"),
               "--model", str(tiny_decoder_dir), "--text-column", "txt"], console=False)
    err = capsys.readouterr().err
    assert rc == 2 and "'txt'" in err and "the columns found: id, body" in err and "--text-column" in err
    _write_jsonl(tmp_path / "c.jsonl", 5, bad=False)
    rc = main(["embed", "--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "out2"),
               "--id-column", "doc"], console=False)
    assert rc == 2 and "the columns found: id, text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()  # refused before anything was written


def test_rerun_with_other_settings_into_the_same_output_is_refused(ray_cluster, tiny_decoder_dir, tmp_path):
    from ray_e5.embed.run import embed_corpus

    _write_jsonl(tmp_path / "c.jsonl", 20, bad=False)
    config = _config(tmp_path, input=tmp_path / "c.jsonl", output=tmp_path / "out", model=tiny_decoder_dir)
    assert embed_corpus(config)["rows_written"] == 20
    config.embed.dimensions = 8
    with pytest.raises(ConfigError, match=r"dimensions: None there, 8 now"):
        embed_corpus(config)


def test_the_embed_section_is_validated_with_the_config():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["embed.dimensions=0", "embed.engine=onnx", "embed.num_gpus=-1", "train.lr=abc"])
    keys = " ".join(err.value.errors)
    for key in ("embed.dimensions", "embed.engine", "embed.num_gpus", "train.lr"):
        assert key in keys
    assert load_config(None, ["embed.input=s3://b/c.parquet", "embed.dimensions=256"]).embed.dimensions == 256


@pytest.mark.slow
def test_killed_driver_resumes_without_duplicates_or_recomputation(ray_cluster, tiny_decoder_dir, tiny, tmp_path):
    """SIGKILL the driver once some shards are written; the rerun embeds only the rest; every id exactly once."""
    from ray_e5.embed.run import embed_corpus

    expected = _write_jsonl(tmp_path / "corpus.jsonl", 3000, bad=False)
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "corpus.jsonl"), "--output", str(out), "--model", str(tiny_decoder_dir),
            "--max-actors", "1", "--dtype", "fp32", "--set", "embed.block_bytes=3000"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen([sys.executable, "-m", "ray_e5.cli", "embed", *args], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while len(list(out.glob("part-*.parquet"))) < 3 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, f"the driver ended before it was killed: {(tmp_path / 'driver.log').read_text()}"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(1.0)  # a shard being renamed as the driver died is whole either way
    before = len(list(out.glob("part-*.parquet")))
    assert before >= 3
    summary = embed_corpus(_config(tmp_path, input=tmp_path / "corpus.jsonl", output=out,
                                   model=tiny_decoder_dir, max_actors=1, block_bytes=3000))
    assert summary["blocks_done_before"] >= 3 and summary["rows_skipped"] > 0
    assert summary["rows_written"] + summary["rows_skipped"] == 3000
    assert summary["blocks_done_before"] < summary["blocks"]  # the kill came before the end: the rerun had work
    _check_vectors(_read(out), expected, tiny)


def test_gpu_path_loads_bf16_weights_and_gives_float32_unit_vectors(tiny_decoder_dir, tiny, tmp_path):
    """A GPU actor's bf16 weights (``dtype: auto`` on a CUDA GPU with bf16; here the same path on the CPU)."""
    import torch

    from ray_e5.embed.config import EmbedSettings
    from ray_e5.embed.run import BlockEmbedder

    actor = BlockEmbedder(EmbedSettings(num_gpus=1, dtype="bf16").model_dump(), str(tiny_decoder_dir),
                          str(tmp_path / "out"))
    assert actor.embedder.dtype == torch.bfloat16
    texts = _texts(20)
    got = actor.embed(texts)
    assert got.dtype == np.float32 and got.shape == (20, tiny.dimension)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    cos = (got * tiny.encode(texts)).sum(1)
    assert cos.min() > 0.98  # bf16 weights: close to the fp32 vectors, not equal


def test_dtype_auto_follows_the_node_and_an_explicit_dtype_wins(tiny_decoder_dir, tmp_path):
    """``embed.dtype: auto`` loads bf16 weights only where this node runs bf16 natively; fp32 stays fp32 on a GPU
    actor when asked for."""
    import torch

    from ray_e5.embed.config import EmbedSettings
    from ray_e5.embed.run import BlockEmbedder
    from ray_e5.model.precision import inference_dtype

    auto = BlockEmbedder(EmbedSettings(dtype="auto").model_dump(), str(tiny_decoder_dir), str(tmp_path / "a"))
    expected = {"bf16": torch.bfloat16, "fp32": torch.float32}[inference_dtype("auto")]
    assert auto.embedder.dtype == expected
    fp32 = BlockEmbedder(EmbedSettings(dtype="fp32", num_gpus=1).model_dump(), str(tiny_decoder_dir),
                         str(tmp_path / "b"))
    assert fp32.embedder.dtype == torch.float32


def test_token_batches_respect_the_budget_and_sort_by_length():
    from ray_e5.embed.run import token_batches

    lengths = [5, 40, 7, 39, 6, 100, 41]
    batches = token_batches(lengths, batch_tokens=90, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [5]  # over the budget with any other: alone
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 90)
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_vllm_processor_is_built_against_the_installed_ray_data_llm(ray_cluster, tiny_decoder_dir, tmp_path):
    """engine vllm: the ray.data.llm processor config (task embed, our token ids, the export's pooling) is built by
    the installed API; vLLM itself (CUDA-only) is not run."""
    import inspect

    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from ray.llm._internal.batch.stages import vllm_engine_stage

    from ray_e5.embed.config import EmbedSettings
    from ray_e5.embed.vllm import BLOCK_COLUMN, vllm_postprocess, vllm_preprocess, vllm_processor_config
    from ray_e5.model.export import export_sentence_transformers
    from ray_e5.serve.vllm_backend import MergedModelText

    embedder = Embedder.load(str(tiny_decoder_dir))
    merged = str(export_sentence_transformers(embedder, tmp_path / "merged"))
    text = MergedModelText.load(merged)
    settings = EmbedSettings(engine="vllm", num_gpus=1, instruction="Given a claim, find evidence")
    config = vllm_processor_config(merged, settings, text.settings.max_length, text.settings.pooling,
                                   text.settings.normalize, max_actors=4)
    assert isinstance(config, vLLMEngineProcessorConfig)
    assert config.task_type == "embed" and config.engine_kwargs["task_type"] == "embed"
    assert config.concurrency == (1, 4)
    assert config.engine_kwargs["override_pooler_config"] == {"pooling_type": "LAST", "normalize": True}
    assert config.engine_kwargs["dtype"] == "bfloat16"
    processor = build_processor(config, preprocess=vllm_preprocess(text, settings.instruction),
                                postprocess=vllm_postprocess)
    stages = list(processor.stages.values())
    assert [type(s).__name__ for s in stages] == ["vLLMEngineStage"]
    row = vllm_preprocess(text, settings.instruction)({"id": "a", "text": "a claim", BLOCK_COLUMN: "part-x"})
    assert row["tokenized_prompt"] == embedder.token_ids(["a claim"], settings.instruction)[0]
    assert {k for k in stages[0].get_optional_input_keys()} >= {"tokenized_prompt"}
    source = inspect.getsource(vllm_engine_stage)
    assert '"override_pooler_config" in kwargs' in source and 'kwargs["convert"] = "embed"' in source
    assert "embeddings" in vllm_engine_stage.vLLMOutputData.model_fields


def test_shards_on_an_s3_output_are_written_whole_and_found_by_a_rerun(tiny_decoder_dir, tiny, tmp_path, monkeypatch):
    """An s3:// output on moto's S3 server: the manifest, the shards, the rejects and the listing a rerun skips by.
    The actor's code runs in this process (the session's Ray workers were started without the moto variables)."""
    from ray_e5.embed.config import EmbedSettings
    from ray_e5.embed.run import BlockEmbedder
    from ray_e5.embed.shards import check_manifest, done_shards
    from ray_e5.embed.units import plan
    from ray_e5.testing.cluster import require_moto, start_moto

    require_moto()
    moto = start_moto(tmp_path)
    try:
        for key, value in moto.env.items():
            monkeypatch.setenv(key, value)
        moto.create_bucket("vectors")
        expected = _write_jsonl(tmp_path / "c.jsonl", 60)
        output = "s3://vectors/run1"
        check_manifest(output, {"model": str(tiny_decoder_dir)})
        with pytest.raises(ConfigError, match="other settings"):
            check_manifest(output, {"model": "minilm-l6"})
        blocks = plan(str(tmp_path / "c.jsonl"), "auto", 10, 1500)
        assert len(blocks) > 1 and done_shards(output) == set()
        actor = BlockEmbedder(EmbedSettings(dtype="fp32").model_dump(), str(tiny_decoder_dir), output)
        results = [actor.run_block(b) for b in blocks]
        assert sum(r["written"] for r in results) == 60 and sum(r["rejected"] for r in results) == 5
        assert done_shards(output) == {b.name for b in blocks}
        again = actor.run_block(blocks[0])  # a retried block whose shard is there: skipped, counted
        assert again["written"] == 0 and again["skipped"] == results[0]["written"]
        fs = moto.filesystem()
        table = pa.concat_tables(pq.read_table(f"vectors/run1/{b.name}.parquet", filesystem=fs) for b in blocks)
        _check_vectors(table, expected, tiny)
        assert pq.read_table("vectors/run1/_rejects", filesystem=fs).num_rows == 5
    finally:
        moto.stop()
