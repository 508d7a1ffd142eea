"""Caching the frozen lower layers' outputs, so a text seen again pays only for the layers LoRA adapts.

With ``model.lora.top_layers: k`` only a decoder's top k layers change during training; the layers below them, and
so their output for a given text, never do (they hold no adapter; their dropout is off). The first time a text is
embedded, the hidden states leaving the last frozen layer are kept (its real tokens only: with right padding, what
a token sees does not depend on the pads after it); the next time, the backbone runs with those layers replaced by a
replay of the kept states, and only the adapted layers (and the pooling) compute. Within an epoch or across epochs,
every repeated text (an SNLI premise under several hypotheses, a source planned at weight > 1, a second epoch)
costs a forward of k layers instead of all of them. A chunk replays only when every text in it was seen (see
``FrozenLayerCache.embed``): a source planned at weight < 1 draws other rows each epoch, so its chunks mostly run
whole, and the gain comes from the sources seen whole every epoch and from repeated short texts (labels).

Written by hand: peft and transformers have no cache of intermediate activations for training (their KV cache is
for decoding). The swap is done per forward on the backbone's ``layers`` list, which transformers' decoders
(Gemma 3, Mistral, Llama, Qwen) all iterate in order; the torch engine only (DeepSpeed ZeRO-3 gathers each layer's
weights in hooks the swap would bypass).
"""

from __future__ import annotations

import torch


class _Replay(torch.nn.Module):
    """Stands in for the first frozen layer: returns the kept hidden states, whatever it is given."""

    def __init__(self, states: torch.Tensor, original: torch.nn.Module):
        super().__init__()
        self.states = states
        self.attention_type = getattr(original, "attention_type", None)  # read by some decoders' loops

    def forward(self, hidden_states, *args, **kwargs):  # noqa: ARG002 - a decoder layer's signature
        return self.states


class _Skip(torch.nn.Module):
    """Stands in for the other frozen layers: passes the hidden states through."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.attention_type = getattr(original, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):  # noqa: ARG002 - a decoder layer's signature
        return hidden_states


def frozen_depth(embedder) -> int:
    """How many of the backbone's bottom layers hold no trainable parameter (0 when every layer is adapted)."""
    layers = decoder_layers(embedder)
    for i, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return len(layers)


def decoder_layers(embedder) -> torch.nn.ModuleList:
    base = embedder._base_model()
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"train.cache_frozen_layers: {type(base).__name__} has no list of decoder layers "
                         "(`layers`) to cache below; set it false")
    return layers


class FrozenLayerCache:
    """An engine whose ``embed`` replays the frozen layers' outputs of texts it has seen; everything else is the
    wrapped engine's. ``max_bytes`` caps what is kept (texts past it are embedded in full every time)."""

    def __init__(self, engine, embedder, max_bytes: int = 4 << 30):
        self.engine = engine
        self.layers = decoder_layers(embedder)
        self.depth = frozen_depth(embedder)
        if self.depth == 0:
            raise ValueError("train.cache_frozen_layers: every layer of the backbone is adapted, so no layer's output "
                             "can be kept; set model.lora.top_layers (LoRA on the top layers only)")
        if self.depth >= len(self.layers):
            raise ValueError("train.cache_frozen_layers: no layer of the backbone is trained")
        self.max_bytes = max_bytes
        self.kept: dict[tuple[int, ...], torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        lengths = mask.sum(-1).tolist()
        if not bool((mask == (torch.arange(mask.shape[1]) < mask.sum(-1, keepdim=True)).to(mask.dtype)).all()):
            return self.engine.embed(batch)  # not right-padded: a token's states could depend on the pads
        keys = [tuple(row[:n].tolist()) for row, n in zip(batch["input_ids"], lengths)]
        if any(key not in self.kept for key in keys):
            # A chunk with any text not seen runs whole: split into a computed and a replayed part (two smaller
            # forwards and backwards), a chunk was slower on a CPU than one full forward, not faster.
            self.misses += len(keys)
            return self._computed(batch, keys)
        self.hits += len(keys)
        return self._replayed(batch, keys)

    def _computed(self, batch: dict[str, torch.Tensor], keys: list[tuple[int, ...]]) -> torch.Tensor:
        """The full forward, keeping what leaves the last frozen layer for each text not kept yet (while there is
        room)."""
        captured = []
        handle = self.layers[self.depth - 1].register_forward_hook(
            lambda m, i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            out = self.engine.embed(batch)
        finally:
            handle.remove()
        states = captured[0].detach()
        for row, key in enumerate(keys):
            if key in self.kept:
                continue
            kept = states[row, :len(key)].clone()
            size = kept.numel() * kept.element_size()
            if self.bytes + size <= self.max_bytes:
                self.kept[key] = kept
                self.bytes += size
        return out

    def _replayed(self, batch: dict[str, torch.Tensor], keys: list[tuple[int, ...]]) -> torch.Tensor:
        """The forward with the frozen layers replaced by the kept states (zeros at the pads, which are masked)."""
        width = batch["input_ids"].shape[1]
        first = self.kept[keys[0]]
        states = first.new_zeros((len(keys), width, first.shape[-1]))
        for row, key in enumerate(keys):
            states[row, :len(key)] = self.kept[key]
        originals = [self.layers[i] for i in range(self.depth)]
        self.layers[0] = _Replay(states.to(self.engine.device), originals[0])
        for i in range(1, self.depth):
            self.layers[i] = _Skip(originals[i])
        try:
            return self.engine.embed(batch)
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

