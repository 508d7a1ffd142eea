"""Tokenisation for embedding: the EOS token is appended by our code and survives truncation.

Last-token pooling reads the hidden state of the final token, so that token must be EOS for every text. Tokenizer
configs cannot be trusted to add it (transformers 5 drops ``add_eos_token`` for Mistral-family tokenizers), so we
truncate to ``max_length - 1`` and append EOS ourselves, then pad on the side asked for.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch


def check_texts(texts: Sequence[str]) -> list[str]:
    """Validate a batch of texts: a list of strings; a non-string item raises TypeError naming its index."""
    if isinstance(texts, str):
        raise TypeError("expected a list of strings, got a single string; wrap it in a list")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"item {i} is {type(text).__name__}, expected str")
    return texts


def token_ids(tokenizer, texts: Sequence[str], max_length: int, append_eos: bool) -> list[list[int]]:
    """Token ids per text, truncated so that, with EOS appended, each fits in ``max_length``."""
    if not texts:
        return []
    # A tokenizer that appends EOS itself (an export's, whose post-processor we rewrote) keeps it inside its own
    # truncation: then the whole budget is its to use, as sentence-transformers gives it.
    budget = max_length - 1 if append_eos and not _appends_eos(tokenizer) else max_length
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=budget)["input_ids"]
    if not append_eos:
        return [list(x) for x in ids]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("this tokenizer has no EOS token; use mean or cls pooling, or set append_eos=False")
    return [list(x) if x and x[-1] == eos else list(x) + [eos] for x in ids]


def _appends_eos(tokenizer) -> bool:
    cached = getattr(tokenizer, "_ray_e5_appends_eos", None)
    if cached is None:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        cached = bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
        try:
            tokenizer._ray_e5_appends_eos = cached
        except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes probes each time
            pass
    return cached


def pad(ids: list[list[int]], pad_id: int, side: Literal["left", "right"] = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest sequence; also return position ids that count real tokens only."""
    width = max((len(x) for x in ids), default=0)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        if not seq:
            continue
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids(mask)}


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding does not shift rotary positions."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
