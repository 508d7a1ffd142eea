"""Pooling of token states into one vector per text."""

from __future__ import annotations

import torch

POOLINGS = ("last", "mean", "cls")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, right or left padded alike."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask).argmax(dim=1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One float32 vector per row, whatever the dtype of ``hidden`` (a bf16/fp16 model's sums and norms would lose
    digits: the mean of 512 bf16 states keeps about 3 significant ones)."""
    if mode == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(mask)].float()
    if mode == "mean":
        weights = mask.unsqueeze(-1).float()
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0].float()
    raise ValueError(f"unknown pooling {mode!r}; accepted: {', '.join(POOLINGS)}")
