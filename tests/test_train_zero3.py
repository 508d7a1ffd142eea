"""ZeRO-3 partitions the backbone as it loads: a worker never holds more than its share plus one layer.

Two gloo workers build the LoRA Embedder and its ZeRO-3 engine as a training worker does, on a random
Mistral-shaped model of 163 MiB (fp32, 8 layers of 20 MiB) made for the test, and measure their own memory:
- through ``engines.build_embedder`` (transformers' HfDeepSpeedConfig alive: ``zero.Init`` at load), each worker's
  anonymous memory while loading stays under its share (1/2) plus one layer (+8 MiB), and over loading and
  ``deepspeed.initialize`` under that plus DeepSpeed's own fixed cost (hooks, communication buffers: 57 MiB measured
  here, 80 MiB allowed; it does not grow with the weights);
- the plain build (``Embedder.from_settings`` then ``deepspeed.initialize``), measured the same way, holds at least
  the whole model on some worker: the measurement sees the materialisation it guards against.
Anonymous memory is sampled every millisecond; on ranks other than 0 (which read no checkpoint values) the exact
resident peak (VmHWM) is held to the same bound, plus 16 MiB of code pages loaded on the way.
"""

from __future__ import annotations

import pytest

MB = 2**20
LOAD_SLACK = 8 * MB
DEEPSPEED_FIXED = 80 * MB


@pytest.fixture(scope="module")
def mid_decoder(tmp_path_factory):
    from ray_e5.testing.models import tiny_decoder
    from ray_e5.testing.train import model_bytes

    path = tiny_decoder(tmp_path_factory.mktemp("mid") / "decoder", hidden_size=768, layers=8)
    sizes = model_bytes(str(path))
    assert sizes["model"] > 150 * MB and sizes["layer"] > 16 * MB
    return str(path), sizes


def _mb(rank: dict) -> str:
    return ", ".join(f"{k} {v / MB:.1f} MB" for k, v in rank.items() if k.endswith(("peak", "bytes")))


@pytest.mark.slow  # two DeepSpeed workers, twice, on a 171 MB model (about 28 s on 2 cores)
def test_zero3_partitions_at_load(mid_decoder, monkeypatch):
    from ray_e5.testing.train import spawn, zero3_load_memory

    path, sizes = mid_decoder
    world = 2
    # glibc's moving mmap threshold keeps freed multi-MB blocks in the heap: resident memory would count memory that
    # nothing holds any more. A fixed threshold returns them; the workers inherit it.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "262144")
    share, layer = sizes["model"] / world, sizes["layer"]
    partitioned = spawn(zero3_load_memory, world, path, True)
    plain = spawn(zero3_load_memory, world, path, False)
    print(f"\nmodel {sizes['model'] / MB:.1f} MB, layer {layer / MB:.1f} MB, share {share / MB:.1f} MB")
    for rank, (p, q) in enumerate(zip(partitioned, plain)):
        print(f"rank {rank} partitioned at load: {_mb(p)}\nrank {rank} plain: {_mb(q)}")
    for rank in partitioned:
        assert rank["partitioned"] == rank["parameters"] > 0
        assert rank["local_param_bytes"] <= share + layer
        assert rank["load_peak"] <= share + layer + LOAD_SLACK
        assert rank["anon_peak"] <= share + layer + DEEPSPEED_FIXED
        assert rank["anon_peak"] < sizes["model"]
    for rank in partitioned[1:]:
        assert rank["hwm_peak"] <= share + layer + DEEPSPEED_FIXED + 16 * MB
    assert max(rank["anon_peak"] for rank in plain) >= sizes["model"]
    assert max(rank["anon_peak"] for rank in plain) > max(rank["anon_peak"] for rank in partitioned) + layer


def test_zero3_load_config_only_for_zero3():
    from ray_e5.train.engines import zero3_load_config
    from ray_e5.testing.train import settings

    assert zero3_load_config(settings(engine="deepspeed", zero_stage=2), "bf16", 4) is None
    assert zero3_load_config(settings(engine="torch", zero_stage=3), "bf16", 4) is None
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    hf = zero3_load_config(settings(engine="deepspeed", zero_stage=3), "bf16", 4)
    try:
        assert is_deepspeed_zero3_enabled()  # what from_pretrained reads: zero.Init at load
        assert hf.config["bf16"]["enabled"] and hf.config["zero_optimization"]["stage"] == 3
    finally:
        unset_hf_deepspeed_config()
    del hf
