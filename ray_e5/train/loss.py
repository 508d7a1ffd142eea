"""InfoNCE over cosine similarities, with in-batch, hard and cross-device negatives; CoSENT on graded batches.

Cross-device negatives: every worker gathers the embeddings of the whole global batch, with its own shard kept as
the tensor that carries gradients, and computes the loss of the *whole* global batch. The gradient a worker gets
is then the exact partial derivative of the global loss with respect to its own embeddings, and the sum over
workers is the full gradient. Training engines average gradients over workers, so the loss is back-propagated
scaled by the world size (``backward_scale``). Only an all-gather is needed (gloo and NCCL both have it), the
G x 2G score matrix costs nothing next to the model, and the result equals one worker holding the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def distributed() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_keep_local(x: torch.Tensor) -> torch.Tensor:
    """All workers' ``x`` concatenated in rank order; only the local slice is connected to the autograd graph."""
    rank, world = distributed()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def gatherer(cross_device: bool):
    """What the losses apply to each embedding tensor: the global batch's gather, or nothing (the local batch)."""
    return gather_keep_local if cross_device else (lambda t: t)


@dataclass
class LossInputs:
    """One worker's share of a batch, in embeddings, with masks over the documents the loss scores.

    ``negatives`` has one row per local query (zeros where a query has no hard negative). ``negative_valid`` and
    ``false_negatives`` cover the documents scored: those of the global batch with cross-device negatives, the
    local ones without (each worker computes them from the batch texts, which it holds).
    """

    queries: torch.Tensor  # (B, d)
    positives: torch.Tensor  # (B, d)
    negatives: torch.Tensor | None = None  # (B, d), or None without hard negatives
    negative_valid: torch.Tensor | None = None  # (N,) bool, N = G or B
    false_negatives: torch.Tensor | None = None  # (N, N or 2N) bool: documents left out for each query
    scores: torch.Tensor | None = None  # (N,) gold scores of a graded batch's pairs: the loss is CoSENT


def info_nce(inputs: LossInputs, temperature: float, cross_device: bool = True,
             symmetric: bool = False) -> torch.Tensor:
    """Mean InfoNCE over the global batch (``cross_device``) or the local one; query i's positive is document i.

    Documents are the positives, then the hard negatives; masked documents (false negatives, missing hard
    negatives) drop out of the softmax. ``symmetric`` averages it with the reverse direction, each positive's
    softmax over the batch's queries (GTE's bidirectional loss, sentence-transformers'
    ``MultipleNegativesSymmetricRankingLoss``): the same embeddings, a second supervision for free. A query whose
    positive equals document i's text is no negative for document i (the false-negative mask, transposed).
    """
    gather = gatherer(cross_device)
    q = gather(inputs.queries)
    docs = [gather(inputs.positives)]
    if inputs.negatives is not None:
        docs.append(gather(inputs.negatives))
    d = torch.cat(docs, dim=0)
    n = q.shape[0]
    scores = (q @ d.T) / temperature
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if inputs.false_negatives is not None:
        fn = inputs.false_negatives.to(scores.device)
        mask[:, :fn.shape[1]] |= fn
    if inputs.negatives is not None and inputs.negative_valid is not None:
        mask[:, n:] |= ~inputs.negative_valid.to(scores.device).unsqueeze(0)
    scores = scores.masked_fill(mask, float("-inf"))
    target = torch.arange(n, device=scores.device)
    forward = F.cross_entropy(scores, target)
    if not symmetric:
        return forward
    return (forward + F.cross_entropy(scores[:, :n].T, target)) / 2


def cosent(inputs: LossInputs, temperature: float, cross_device: bool = True) -> torch.Tensor:
    """CoSENT (Su 2022; sentence-transformers' ``CoSENTLoss``, AnglE's cosine objective): for every two pairs of
    the batch whose gold scores differ, the lower-scored pair's cosine should be below the higher one's:
    ``log(1 + sum exp((cos_j - cos_i) / temperature))`` over pairs with ``score_i > score_j``. Ties add nothing.
    Query i's pair is (query i, positive i); with ``cross_device`` the pairs of the whole global batch."""
    gather = gatherer(cross_device)
    cos = (gather(inputs.queries) * gather(inputs.positives)).sum(-1) / temperature
    scores = inputs.scores.to(cos.device)
    diff = cos.unsqueeze(0) - cos.unsqueeze(1)  # [i, j] = cos_j - cos_i
    ranked = scores.unsqueeze(1) > scores.unsqueeze(0)  # [i, j]: pair i should score above pair j
    return torch.logsumexp(torch.cat([cos.new_zeros(1), diff[ranked]]), dim=0)


def pair_loss(inputs: LossInputs, temperature: float, cross_device: bool = True,
              symmetric: bool = False) -> torch.Tensor:
    """CoSENT on a graded batch (``scores`` set), InfoNCE (``symmetric`` or not) on every other."""
    if inputs.scores is not None:
        return cosent(inputs, temperature, cross_device)
    return info_nce(inputs, temperature, cross_device, symmetric)


def truncated(x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """The first ``dim`` components, re-normalised: what a client asking for ``dimensions=dim`` gets."""
    return None if x is None else F.normalize(x[:, :dim], dim=-1)


def contrastive_loss(inputs: LossInputs, temperature: float, cross_device: bool = True,
                     matryoshka_dims: list[int] | tuple[int, ...] = (), symmetric: bool = False) -> torch.Tensor:
    """InfoNCE (CoSENT on a graded batch) on the full embeddings, or with ``matryoshka_dims`` the sum at each truncated,
    re-normalised width (Kusupati et al. 2022; sentence-transformers' ``MatryoshkaLoss`` with unit weights), so a
    vector cut to any of those widths stays a good embedding. The truncation is differentiable, so gradient
    caching and cross-device negatives work unchanged."""
    if not matryoshka_dims:
        return pair_loss(inputs, temperature, cross_device, symmetric)
    total = None
    for dim in matryoshka_dims:
        part = pair_loss(LossInputs(truncated(inputs.queries, dim), truncated(inputs.positives, dim),
                                    truncated(inputs.negatives, dim), inputs.negative_valid, inputs.false_negatives,
                                    inputs.scores), temperature, cross_device, symmetric)
        total = part if total is None else total + part
    return total


def backward_scale(cross_device: bool) -> float:
    """Factor on the loss before backward so that worker-averaged gradients equal the global-batch gradient."""
    return float(distributed()[1]) if cross_device else 1.0
