"""Souping LoRA embedders: the soup's weights are the exact average of its ingredients' merged weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ray_e5.config import LoraSettings
from ray_e5.model import Embedder
from ray_e5.model.soup import SoupError, soup

TEXTS = ["a cat sat on the mat", "stocks fell sharply today", "how do I reset my card pin"]


def _trained(tiny_decoder_dir, seed: int, tmp_path, **lora):
    """A LoRA embedder whose adapters are random (as after training: B is not zero), saved under tmp_path."""
    torch.manual_seed(seed)
    embedder = Embedder.load(str(tiny_decoder_dir), pooling="mean", lora=LoraSettings(**{"r": 4, "alpha": 8, **lora}))
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    return embedder.save(tmp_path / f"emb-{seed}")


def _merged_state(directory) -> dict[str, torch.Tensor]:
    model = Embedder.load(str(directory), merge_lora=True).backbone
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_soup_is_the_average_of_its_ingredients_merged_weights(tiny_decoder_dir, tmp_path):
    a, b = _trained(tiny_decoder_dir, 1, tmp_path), _trained(tiny_decoder_dir, 2, tmp_path, alpha=16)
    out = soup([a, b], tmp_path / "soup", weights=[0.25, 0.75])
    manifest = json.loads((out / "ray_e5.json").read_text())
    assert manifest["soup"]["weights"] == [0.25, 0.75] and "adapter/adapter_model.safetensors" in manifest["files"]
    sa, sb, ss = _merged_state(a), _merged_state(b), _merged_state(out)
    changed = 0
    for name, value in ss.items():
        expected = 0.25 * sa[name] + 0.75 * sb[name]
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5)
        changed += not torch.allclose(sa[name], sb[name])
    assert changed > 0  # the ingredients differ, so the test can fail
    vectors = Embedder.load(str(out)).encode(TEXTS)
    assert vectors.shape == (3, 64) and np.isfinite(vectors).all()
    assert not np.allclose(vectors, Embedder.load(str(a)).encode(TEXTS), atol=1e-4)


def test_what_cannot_be_souped_is_refused_naming_the_difference(tiny_decoder_dir, tmp_path):
    a = _trained(tiny_decoder_dir, 1, tmp_path)
    other_layout = _trained(tiny_decoder_dir, 3, tmp_path, top_layers=1)
    with pytest.raises(SoupError, match="at least two"):
        soup([a], tmp_path / "s1")
    with pytest.raises(SoupError, match="the adapters differ in|different weights"):
        soup([a, other_layout], tmp_path / "s2")
    with pytest.raises(SoupError, match="not an embedder directory"):
        soup([a, tmp_path], tmp_path / "s3")
    with pytest.raises(SoupError, match="non-negative"):
        soup([a, a], tmp_path / "s4", weights=[1.0, -1.0])
