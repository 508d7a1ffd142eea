"""Gradient caching under DeepSpeed ZeRO-2 and ZeRO-3: the same gradients as the uncached step."""

from __future__ import annotations

import pytest
import torch

from ray_e5.testing.train import spawn, step_gradients
from ray_e5.train.config import TrainSettings
from ray_e5.train.loss import build_loss

ROW = {"query": [f"query number {i} about the fox" for i in range(8)],
       "positive": [f"positive document {i} quick brown" for i in range(8)],
       "negative": [f"negative {i} lazy dog" if i % 3 else "" for i in range(8)],
       "task": ["Retrieve the matching document"] * 8}


@pytest.mark.slow  # DeepSpeed start-up on 2 gloo workers (the first run on a machine also JIT-builds its shm op)
@pytest.mark.parametrize("stage", [2, 3])
def test_gradient_cache_under_zero(tiny_decoder_dir, stage):
    variants = [(None, False), (3, True), (1, True)]  # uncached; cached in chunks of 3; cached one text at a time
    # Partition every parameter, however small (DeepSpeed keeps ones under 1e5 elements whole by default, which
    # would leave the tiny decoder unpartitioned under ZeRO-3).
    extra = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    loss = build_loss(TrainSettings(temperature=0.05))
    ranks = spawn(step_gradients, 2, str(tiny_decoder_dir), ROW,
                  {"engine": "deepspeed", "zero_stage": stage, "deepspeed": extra}, variants, loss)
    reference = step_gradients(0, 1, str(tiny_decoder_dir), ROW, {"engine": "torch"}, [(None, False)], loss)["runs"][0]
    for rank in ranks:
        if stage == 3:
            assert rank["partitioned"] == rank["trainable"] > 0
        uncached = rank["runs"][0]
        assert all(g is not None for g in uncached["grads"].values())
        for run in rank["runs"]:
            assert run["loss"] == pytest.approx(uncached["loss"], abs=1e-6)
            for name, grad in uncached["grads"].items():
                torch.testing.assert_close(run["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
                # ... and equal to one plain-torch worker holding the whole batch
                torch.testing.assert_close(run["grads"][name], reference["grads"][name], rtol=0, atol=1e-5, msg=name)
