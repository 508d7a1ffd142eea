"""The training losses, as objects built once from the settings (``build_loss``) and called on every step.

``loss(inputs)`` takes one worker's share of a batch, in embeddings (``LossInputs``), and returns the scalar to
back-propagate after ``loss.backward_scale()``. ``build_loss(settings)`` gives a ``SourceLoss`` (InfoNCE on pairs and
triplets, CoSENT on graded pairs), wrapped in ``Matryoshka`` when ``matryoshka_dims`` is set and in
``ScoreDistillation`` when ``distill`` is.

Cross-device negatives: every worker gathers the embeddings of the whole global batch, with its own shard kept as
the tensor that carries gradients, and computes the loss of the *whole* global batch. The gradient a worker gets
is then the exact partial derivative of the global loss with respect to its own embeddings, and the sum over
workers is the full gradient. Training engines average gradients over workers, so the loss is back-propagated
scaled by the world size (``Loss.backward_scale``). Only an all-gather is needed (gloo and NCCL both have it), the
G x 2G score matrix costs nothing next to the model, and the result equals one worker holding the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from ray_e5.train.config import TrainSettings


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
    # the teacher's embeddings of the same texts (queries, positives, negatives or None), for ScoreDistillation
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None


class Loss:
    """A loss over one worker's share of a batch: ``loss(inputs) -> scalar``.

    ``cross_device``: the loss scores the whole global batch (gathered from every worker) rather than the local
    share; the step slices the batch texts, and scales the loss before backward, accordingly.
    ``mask_false_negatives``: the step computes the false-negative mask for this loss to use.
    """

    cross_device: bool = True
    mask_false_negatives: bool = False

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        raise NotImplementedError

    def backward_scale(self) -> float:
        """Factor on the loss before backward so that worker-averaged gradients equal the global-batch gradient."""
        return float(distributed()[1]) if self.cross_device else 1.0


@dataclass(frozen=True)
class InfoNCE(Loss):
    """InfoNCE over cosine similarities (the paper's loss; sentence-transformers' ``MultipleNegativesRankingLoss``):
    the mean over queries of -log softmax(cos / temperature) of the query's own positive among the documents, which
    are the positives of the batch (in-batch negatives), then the hard negatives. Query i's positive is document i.

    Masked documents drop out of the softmax: missing hard negatives always, and with ``mask_false_negatives`` a
    document whose text equals the query's positive (a copy of the positive is no negative).

    ``symmetric`` averages it with the reverse direction, each positive's softmax over the batch's queries (GTE's
    bidirectional loss, sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``): the same embeddings, a
    second supervision for free. A query whose positive equals document i's text is no negative for document i
    (the false-negative mask, transposed).
    """

    temperature: float = 0.02
    symmetric: bool = False
    cross_device: bool = True
    mask_false_negatives: bool = True

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        gather = gatherer(self.cross_device)
        q = gather(inputs.queries)
        docs = [gather(inputs.positives)]
        if inputs.negatives is not None:
            docs.append(gather(inputs.negatives))
        d = torch.cat(docs, dim=0)
        n = q.shape[0]
        scores = (q @ d.T) / self.temperature
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        if self.mask_false_negatives and inputs.false_negatives is not None:
            fn = inputs.false_negatives.to(scores.device)
            mask[:, :fn.shape[1]] |= fn
        if inputs.negatives is not None and inputs.negative_valid is not None:
            mask[:, n:] |= ~inputs.negative_valid.to(scores.device).unsqueeze(0)
        scores = scores.masked_fill(mask, float("-inf"))
        target = torch.arange(n, device=scores.device)
        forward = F.cross_entropy(scores, target)
        if not self.symmetric:
            return forward
        return (forward + F.cross_entropy(scores[:, :n].T, target)) / 2


@dataclass(frozen=True)
class CoSENT(Loss):
    """CoSENT (Su 2022; sentence-transformers' ``CoSENTLoss``, AnglE's cosine objective) on a graded batch: for
    every two pairs whose gold scores differ, the lower-scored pair's cosine should be below the higher one's:
    ``log(1 + sum exp(scale * (cos_j - cos_i)))`` over pairs with ``score_i > score_j``. Ties add nothing.

    Why: InfoNCE only learns which document is *the* match; graded pairs (STS, pair classification) say how
    similar two texts are, and CoSENT trains the cosines to rank as those grades rank, which InfoNCE on the
    best-scored pairs cannot. Query i's pair is (query i, positive i); with ``cross_device`` the pairs of the whole
    global batch. ``scale`` is the inverse of a temperature (sentence-transformers' default 20).
    """

    scale: float = 20.0
    cross_device: bool = True

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        gather = gatherer(self.cross_device)
        cos = (gather(inputs.queries) * gather(inputs.positives)).sum(-1) * self.scale
        scores = inputs.scores.to(cos.device)
        diff = cos.unsqueeze(0) - cos.unsqueeze(1)  # [i, j] = cos_j - cos_i
        ranked = scores.unsqueeze(1) > scores.unsqueeze(0)  # [i, j]: pair i should score above pair j
        return torch.logsumexp(torch.cat([cos.new_zeros(1), diff[ranked]]), dim=0)


@dataclass(frozen=True)
class SourceLoss(Loss):
    """The loss of a batch's source: ``cosent`` on graded pairs (the batch carries gold ``scores``, a source with
    ``loss: cosent``), ``contrastive`` on every other batch (pairs and triplets). A batch holds one source's kind,
    so one call is one of the two; both score the same documents (one ``cross_device``)."""

    contrastive: InfoNCE
    cosent: CoSENT

    def __post_init__(self) -> None:
        if self.contrastive.cross_device != self.cosent.cross_device:
            raise ValueError("the contrastive and CoSENT losses must both gather the global batch, or neither")

    @property
    def cross_device(self) -> bool:
        return self.contrastive.cross_device

    @property
    def mask_false_negatives(self) -> bool:
        return self.contrastive.mask_false_negatives

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.scores is not None:
            return self.cosent(inputs)
        return self.contrastive(inputs)


def truncated(x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """The first ``dim`` components, re-normalised: what a client asking for ``dimensions=dim`` gets."""
    return None if x is None else F.normalize(x[:, :dim], dim=-1)


@dataclass(frozen=True)
class WrappedLoss(Loss):
    """A loss computed around ``base``: it scores the documents ``base`` scores, with the same masks."""

    base: Loss

    @property
    def cross_device(self) -> bool:
        return self.base.cross_device

    @property
    def mask_false_negatives(self) -> bool:
        return self.base.mask_false_negatives


@dataclass(frozen=True)
class Matryoshka(WrappedLoss):
    """Matryoshka representation learning (Kusupati et al. 2022; sentence-transformers' ``MatryoshkaLoss`` with unit
    weights): the sum of ``base`` at each width of ``dims``, on the embeddings cut to their first ``dim`` components
    and re-normalised, so that a vector cut to any of those widths stays a good embedding.

    The re-normalisation is what a client asking for ``dimensions=dim`` gets (a cut vector is no longer unit
    length, and the losses score cosines). The truncation is differentiable, so gradient caching and cross-device
    negatives work unchanged.
    """

    dims: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        if not self.dims:
            raise ValueError("Matryoshka needs at least one width")

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        total = None
        for dim in self.dims:
            part = self.base(LossInputs(truncated(inputs.queries, dim), truncated(inputs.positives, dim),
                                        truncated(inputs.negatives, dim), inputs.negative_valid,
                                        inputs.false_negatives, inputs.scores))
            total = part if total is None else total + part
        return total


def _document_scores(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, inputs: LossInputs,
                     gather, mask_false_negatives: bool) -> torch.Tensor:
    """Cosines of the (gathered) queries over the batch's documents, positives then hard negatives, with the
    documents InfoNCE leaves out (missing negatives, copies of the positive) at -inf."""
    q, docs = gather(q), [gather(pos)] + ([gather(neg)] if neg is not None else [])
    scores = q @ torch.cat(docs, dim=0).T
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if mask_false_negatives and inputs.false_negatives is not None:
        fn = inputs.false_negatives.to(scores.device)
        mask[:, :fn.shape[1]] |= fn
    if neg is not None and inputs.negative_valid is not None:
        mask[:, q.shape[0]:] |= ~inputs.negative_valid.to(scores.device).unsqueeze(0)
    return scores.masked_fill(mask, float("-inf"))


@dataclass(frozen=True)
class ScoreDistillation(WrappedLoss):
    """``base`` plus ``weight`` x KL(teacher || student) of each query's softmax over the batch's documents
    (RocketQAv2's and sentence-transformers' ``DistillKLDivLoss`` on bi-encoder cosines): the teacher's cosines
    over ``teacher_temperature``, the student's over ``temperature``. A frozen teacher embedder (here a small
    sentence encoder, on a cluster a large one) says how close every query is to every document of the batch,
    which labels of one positive per query cannot; scores, not vectors, are matched, so the two models' widths
    may differ. Graded batches (no negatives) distil over their positives alike."""

    weight: float = 1.0
    temperature: float = 0.05
    teacher_temperature: float = 0.05

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        value = self.base(inputs)
        if inputs.teacher is None:
            return value
        gather = gatherer(self.cross_device)
        tq, tp, tn = inputs.teacher
        neg = inputs.negatives if tn is not None else None
        student = _document_scores(inputs.queries, inputs.positives, neg, inputs, gather, self.mask_false_negatives)
        with torch.no_grad():
            teacher = _document_scores(tq.to(student.dtype), tp.to(student.dtype),
                                       None if tn is None else tn.to(student.dtype), inputs, gather,
                                       self.mask_false_negatives)
            target = torch.softmax(teacher / self.teacher_temperature, dim=-1)
        log_student = torch.log_softmax(student / self.temperature, dim=-1)
        # masked documents: target 0 (0 x log 0 counted as 0), never a NaN
        kl = (target * (torch.log(target.clamp_min(1e-12)) - log_student.clamp_min(-1e4))).sum(-1).mean()
        return value + self.weight * kl


def build_loss(settings: "TrainSettings") -> Loss:
    """The training loss of validated ``train:`` settings, built once per worker: InfoNCE on pairs and triplets
    (``temperature``, ``symmetric_loss``, ``cross_device_negatives``, ``mask_false_negatives``), CoSENT on graded
    pairs (scale: the inverse temperature, 0.05 giving the usual 20), summed over ``matryoshka_dims`` when set."""
    cross_device = settings.cross_device_negatives
    loss: Loss = SourceLoss(
        InfoNCE(temperature=settings.temperature, symmetric=settings.symmetric_loss, cross_device=cross_device,
                mask_false_negatives=settings.mask_false_negatives),
        CoSENT(scale=1.0 / settings.temperature, cross_device=cross_device))
    if settings.matryoshka_dims:
        loss = Matryoshka(loss, tuple(settings.matryoshka_dims))
    if settings.distill is not None:
        loss = ScoreDistillation(loss, settings.distill.weight, settings.temperature, settings.distill.temperature)
    return loss
