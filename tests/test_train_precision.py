"""The torch engine under bf16 autocast holds the frozen Linear weights in bf16: the same outputs and gradients as
autocast casting fp32 weights in every forward, and the module still embeds outside the training step."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ray_e5.testing.models import lora_embedder, tiny_gemma3
from ray_e5.train.config import TrainSettings
from ray_e5.train.engines import make_engine
from ray_e5.train.step import length_chunks

TEXTS = ["a cat sat on the mat", "stocks fell sharply today after the report", "how do I reset my card pin",
         "the weather is nice"]


def test_frozen_weights_held_in_bf16_give_autocasts_outputs_and_gradients(tmp_path):
    embedder = lora_embedder(tiny_gemma3(tmp_path / "g3", layers=3), top_layers=1, max_length=64)
    reference = copy.deepcopy(embedder)  # fp32 weights, cast by autocast in every forward
    engine = make_engine(embedder, TrainSettings(engine="torch", cpu_autocast="bf16"), 10, "fp32", 4,
                         torch.device("cpu"))
    linears = [m for m in embedder.modules() if isinstance(m, torch.nn.Linear)]
    frozen = [m for m in linears if not m.weight.requires_grad]
    trainable = [m for m in linears if m.weight.requires_grad]
    assert frozen and trainable  # the base projections, and LoRA's A and B
    assert all(m.weight.dtype == torch.bfloat16 for m in frozen)
    assert all(m.weight.dtype == torch.float32 for m in trainable)
    norms = [p for n, p in embedder.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)  # norms and embeddings keep theirs

    (_, batch), = length_chunks(embedder, TEXTS, None)
    held = engine.embed(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = reference(**batch).float()
    assert held.dtype == torch.float32 and float(held.detach().norm(dim=-1).min()) > 0.5
    torch.testing.assert_close(held, cast, rtol=0, atol=1e-6)
    held.square().sum().backward()
    cast.square().sum().backward()
    grads = {n: p.grad for n, p in embedder.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-6, msg=name)

    # a dev evaluation runs the module as the training does (under the engine's precision)
    with engine.precision():
        vectors = embedder.encode(TEXTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_vectors = reference.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), embedder.dimension)
    np.testing.assert_allclose(vectors, expected_vectors, atol=1e-6)


def test_without_autocast_the_weights_stay_float32(tmp_path):
    embedder = lora_embedder(tiny_gemma3(tmp_path / "g3", layers=3), top_layers=1, max_length=64)
    make_engine(embedder, TrainSettings(engine="torch", cpu_autocast="off"), 10, "fp32", 4, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in embedder.parameters())
