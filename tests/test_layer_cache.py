"""Caching the frozen lower layers: replayed texts get the same embeddings and gradients as a full forward."""

from __future__ import annotations

import pytest
import torch

from ray_e5.train.layer_cache import FrozenLayerCache, frozen_depth
from ray_e5.testing.models import lora_embedder, tiny_gemma3
from ray_e5.train.step import length_chunks

TEXTS = ["a cat sat on the mat", "stocks fell sharply today after the report", "how do I reset my card pin",
         "the weather is nice", "a cat sat on the mat again and again"]


class _Plain:
    """The torch engine's embed, without autocast: what the cache wraps."""

    device = torch.device("cpu")

    def __init__(self, embedder):
        self.embedder = embedder

    def embed(self, batch):
        return self.embedder(**batch)


def _grads(embedder):
    return {n: p.grad.clone() for n, p in embedder.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("gemma", [False, True])
def test_replayed_texts_embed_and_backpropagate_as_a_full_forward(tiny_decoder_dir, tmp_path, gemma):
    directory = tiny_gemma3(tmp_path / "g3", layers=3) if gemma else tiny_decoder_dir
    embedder = lora_embedder(directory, top_layers=1)
    assert frozen_depth(embedder) == len(embedder._base_model().layers) - 1 >= 1
    cache = FrozenLayerCache(_Plain(embedder), embedder)
    (rows, batch), = length_chunks(embedder, TEXTS[:3], None)
    first = cache.embed(batch)  # all misses: computed and kept
    assert (cache.hits, cache.misses) == (0, 3) and len(cache.kept) == 3
    first.sum().backward()
    full_grads = _grads(embedder)
    embedder.zero_grad()
    (_, mixed), = length_chunks(embedder, TEXTS[1:], None)  # two seen, two new: computed whole, the new ones kept
    again = cache.embed(mixed)
    assert (cache.hits, cache.misses) == (0, 7) and len(cache.kept) == 5
    reference = embedder(**mixed)
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-5)
    embedder.zero_grad()
    replayed = cache.embed(batch)  # all three replayed
    assert cache.hits == 3
    torch.testing.assert_close(replayed, first.detach(), atol=1e-5, rtol=1e-5)
    replayed.sum().backward()
    for name, grad in _grads(embedder).items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-5, rtol=1e-4)
    assert full_grads and all(g.abs().sum() > 0 for g in full_grads.values())
    (_, seen), = length_chunks(embedder, TEXTS[3:], None)  # the two kept from the mixed chunk replay now
    torch.testing.assert_close(cache.embed(seen), embedder(**seen), atol=1e-5, rtol=1e-5)
    assert cache.hits == 5
    # the layers are the backbone's own again after every forward
    assert all(type(layer).__name__ not in ("_Replay", "_Skip") for layer in cache.layers)


def test_a_backbone_adapted_everywhere_or_deepspeed_is_refused(tiny_decoder_dir):
    from ray_e5.train.config import TrainSettings

    with pytest.raises(ValueError, match="every layer of the backbone is adapted"):
        FrozenLayerCache(_Plain(None), lora_embedder(tiny_decoder_dir, top_layers=None))
    with pytest.raises(ValueError, match="cache_frozen_layers needs engine: torch"):
        TrainSettings(cache_frozen_layers=True, engine="deepspeed")
