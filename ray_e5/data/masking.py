"""False negatives: an in-batch document whose text equals a query's positive is not a negative for that query.

Duplicates are common in task-homogeneous batches (several SNLI premises share a hypothesis, synthetic STS pairs
repeat), and scoring a copy of the positive as a negative teaches the model to push apart identical texts.
"""

from __future__ import annotations

from typing import Sequence

import torch


def false_negative_mask(positives: Sequence[str], documents: Sequence[str]) -> torch.Tensor:
    """Bool (len(positives), len(documents)): True where document j equals query i's positive and j != i.

    Document i is query i's own positive (documents start with the positives, in query order), so it is never
    masked.
    """
    index: dict[str, list[int]] = {}
    for j, text in enumerate(documents):
        index.setdefault(text, []).append(j)
    mask = torch.zeros((len(positives), len(documents)), dtype=torch.bool)
    for i, text in enumerate(positives):
        for j in index.get(text, ()):
            if j != i:
                mask[i, j] = True
    return mask
