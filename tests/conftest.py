"""Shared fixtures: one local Ray cluster per session, tiny and real models, the shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("RAY_E5_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets of ../shared/data; tests that need them skip, saying so, when they are absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"../shared/data is absent (looked in {SHARED_DATA}); set RAY_E5_SHARED_DATA to run this test")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (2 CPUs, as the CI machine has)."""
    import ray

    if not ray.is_initialized():
        from ray_e5.cluster import loopback_only

        loopback_only()  # the tests' traffic stays on 127.0.0.1, as a quickstart's does; address "local": a new
        # cluster of its own, never one that `ray start` left running on this machine
        ray.init(address="local", num_cpus=int(os.environ.get("RAY_E5_TEST_CPUS", "4")), include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    """A random Mistral-shaped decoder with a tokenizer trained on the spot (milliseconds to build)."""
    from ray_e5.testing.models import tiny_decoder

    return tiny_decoder(tmp_path_factory.mktemp("tiny") / "decoder")


@pytest.fixture(scope="session")
def gemma():
    """The real packaged Gemma 3 270M as an Embedder (dequantised once per machine, then cached)."""
    from ray_e5.model import Embedder

    return Embedder.load("gemma3-270m")


@pytest.fixture(scope="session")
def minilm():
    from ray_e5.model import Embedder

    return Embedder.load("minilm-l6")


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """moto's S3 server on loopback, with the buckets the tests use (``data``, ``runs``), one per test module."""
    import ray_e5.testing.cluster as cs

    cs.require_moto()
    server = cs.start_moto(tmp_path_factory.mktemp("moto"))
    try:
        for bucket in ("data", "runs"):
            server.create_bucket(bucket)
        yield server
    finally:
        server.stop()
