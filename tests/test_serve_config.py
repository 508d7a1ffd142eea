"""Serve configuration without a server: the vLLM pooling backend for GPU nodes, bad `serve:` keys, serve.yaml.

vLLM's wheel is CUDA-only, so it never runs on CPU CI. What is checked is everything on our side of the vLLM call:
the merged directory is read back (tokenizer, pooling, template, length limit), the token ids handed to vLLM are the
Embedder's, and the engine arguments carry the export's pooling and normalisation.
"""

from __future__ import annotations

import importlib.util

import pytest

from ray_e5.config import ConfigError, load_config
from ray_e5.model import Embedder
from ray_e5.serve.config import ServeSettings

TEXTS = ["short", "a much longer text that the twelve token limit of this export has to cut somewhere", ""]
TASK = "Given a question, retrieve passages that answer it"


@pytest.fixture(scope="module")
def merged(tiny_decoder_dir, tmp_path_factory):
    from ray_e5.model.export import export_sentence_transformers

    embedder = Embedder.load(str(tiny_decoder_dir))
    embedder.settings = embedder.settings.model_copy(update={"max_length": 12})
    out = export_sentence_transformers(embedder, tmp_path_factory.mktemp("merged") / "tiny")
    return embedder, str(out)


def test_merged_text_side_gives_the_embedders_token_ids(merged):
    from ray_e5.serve.vllm_backend import MergedModelText

    embedder, path = merged
    text = MergedModelText.load(path)
    assert text.settings.pooling == "last" and text.settings.normalize and text.dimension == embedder.dimension
    for instruction in (None, TASK):
        ours, theirs = embedder.token_ids(TEXTS, instruction), text.token_ids(TEXTS, instruction)
        assert theirs == ours
    assert max(len(ids) for ids in ours) == 12 and all(ids[-1] == embedder.tokenizer.eos_token_id for ids in ours)


def test_engine_arguments_carry_the_exports_pooling(merged):
    from ray_e5.serve.vllm_backend import MergedModelText, vllm_engine_kwargs

    _, path = merged
    text = MergedModelText.load(path)
    settings = ServeSettings(backend="vllm", num_gpus=0.5, vllm={"tensor_parallel_size": 2, "dtype": "bfloat16"})
    kwargs = vllm_engine_kwargs(settings, path, text)
    assert kwargs == {"model": path, "runner": "pooling", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.9,
                      "dtype": "bfloat16", "max_model_len": 12,
                      "pooler_config": {"pooling_type": "LAST", "normalize": True}}
    longer = settings.model_copy(update={"vllm": settings.vllm.model_copy(update={"max_model_len": 4096})})
    assert vllm_engine_kwargs(longer, path, text)["max_model_len"] == 4096


def test_vllm_backend_refuses_an_unmerged_directory(tiny_decoder_dir):
    from ray_e5.serve.vllm_backend import MergedModelText, NotAMergedModel

    with pytest.raises(NotAMergedModel, match=r"ray-e5 export.*modules\.json"):
        MergedModelText.load(tiny_decoder_dir)


def test_vllm_backend_without_vllm_names_the_extra(merged):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed on this node: the missing-vLLM message cannot be produced here")
    from ray_e5.serve.vllm_backend import MergedModelText, VllmForward

    _, path = merged
    with pytest.raises(RuntimeError, match=r"pip install 'ray-e5\[gpu\]'"):
        VllmForward(ServeSettings(backend="vllm", num_gpus=1), path, MergedModelText.load(path))


@pytest.mark.parametrize("overrides, message", [
    (["serve.backend=vllm"], r"serve: .*num_gpus > 0"),
    (["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"], r"serve\.autoscaling: .*min_replicas"),
    (["serve.ingress=nginx"], r"serve\.ingress: .*'haproxy' or 'proxy'"),
])
def test_bad_serve_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides).section("serve", ServeSettings)


def test_shipped_serve_deploy_config_is_valid_and_its_ingress_agrees():
    """configs/serve.yaml passes Ray's own deploy schema; its app args are valid settings; controller and replicas
    get the same ingress switch (a mismatch would leave no one listening)."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ray_e5.config import validate

    data = yaml.safe_load((Path(__file__).parents[1] / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    settings = validate(ServeSettings, schema.applications[0].args, prefix="serve.")
    assert schema.controller_options.runtime_env["env_vars"] == settings.ingress_env()


# ---- serve.dtype ---------------------------------------------------------------------------------------------
def test_serve_dtype_defaults_to_bf16_on_gpu_replicas_and_reaches_vllm(merged):
    from ray_e5.serve.vllm_backend import MergedModelText, vllm_engine_kwargs

    assert ServeSettings().replica_dtype() == "fp32"
    assert ServeSettings(num_gpus=0.5).replica_dtype() == "bf16"
    assert ServeSettings(num_gpus=1, dtype="fp16").replica_dtype() == "fp16"
    assert ServeSettings(dtype="bf16").replica_dtype() == "bf16"  # asked for on a CPU replica: honoured
    _, path = merged
    text = MergedModelText.load(path)
    assert vllm_engine_kwargs(ServeSettings(backend="vllm", num_gpus=1), path, text)["dtype"] == "bfloat16"
    assert vllm_engine_kwargs(ServeSettings(backend="vllm", num_gpus=1, dtype="fp32"), path, text)["dtype"] == "float32"


@pytest.mark.parametrize("overrides, message", [
    (["serve.dtype=float16"], r"serve\.dtype: .*'fp32', 'bf16' or 'fp16'"),
    (["serve.dtype=bf16", "serve.vllm.dtype=float16"], r"serve: dtype 'bf16' and vllm\.dtype 'float16' disagree"),
])
def test_bad_serve_dtypes_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides).section("serve", ServeSettings)


# CPU bf16 against fp32, the same merged model: per-text cosine at least this (measured on the tiny decoder: 0.9999)
SERVED_BF16_MIN_COSINE = 0.995


def test_a_bf16_replica_serves_vectors_within_tolerance_of_fp32(merged):
    """What a replica loads (Embedder.load(..., dtype=settings.replica_dtype())) and what its forward returns."""
    import numpy as np
    import torch

    _, path = merged
    replica = ServeSettings(dtype="bf16")
    served = Embedder.load(path, merge_lora=True, dtype=replica.replica_dtype())
    assert {p.dtype for p in served.backbone.parameters()} == {torch.bfloat16}
    reference = Embedder.load(path, merge_lora=True, dtype=ServeSettings().replica_dtype())
    assert reference.dtype == torch.float32
    ours, theirs = served.encode(TEXTS, instruction=TASK), reference.encode(TEXTS, instruction=TASK)
    assert ours.dtype == np.float32
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    print(f"served bf16 vs fp32: min cosine {cos.min():.6f}, max abs {np.abs(ours - theirs).max():.2e}")
    assert cos.min() >= SERVED_BF16_MIN_COSINE and np.abs(ours - theirs).max() > 0
