"""One optimisation step on a worker's slice of a global batch: plain, or with gradient caching.

Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
embed every text in chunks without a graph, compute the loss and its gradient with respect to the embeddings
(gathered over workers), then re-embed chunk by chunk with a graph and back-propagate each chunk's embedding
gradient. Memory holds one chunk's activations, whatever the batch size; the random state (LoRA dropout) of each
chunk is replayed so the second forward equals the first.

Every worker makes the same sequence of forward and backward calls (ZeRO-3 gathers parameters collectively in each):
all workers embed B queries, B positives and, when any row of the global batch has a hard negative, B negatives,
with an empty text standing in for a missing one and masked out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ray_e5.data.format import format_queries
from ray_e5.data.masking import false_negative_mask
from ray_e5.model.tokenize import pad
from ray_e5.train.loss import Loss, LossInputs


@dataclass
class StepTexts:
    """A worker's texts for one step, and the masks over the documents the loss scores."""

    queries: list[str]  # instruction-formatted
    positives: list[str]
    negatives: list[str]  # one per local row ("" where a row has none: embedded, then masked out of the loss)
    negative_valid: torch.Tensor | None
    false_negatives: torch.Tensor | None
    scores: torch.Tensor | None = None  # a graded batch's pair scores (the documents scored): CoSENT, not InfoNCE
    raw_queries: list[str] | None = None  # the queries without their instruction (what a teacher embeds)


def prepare(row: dict, rank: int, world: int, template: str, hard_negatives: bool = True,
            cross_device: bool = True, mask_false_negatives: bool = True) -> StepTexts:
    """Slice a global batch row (lists of query/positive/negative/task, and score on a graded batch) for ``rank``
    of ``world`` workers."""
    size = len(row["query"])
    if size % world:
        raise ValueError(f"a global batch of {size} cannot be split over {world} workers")
    local = slice(rank * (size // world), (rank + 1) * (size // world))
    scope = slice(None) if cross_device else local  # the documents the loss scores
    scores = row.get("score")
    if scores is not None and len(scores):  # graded pairs: no negatives, no masks, their scores
        return StepTexts(format_queries(row["query"][local], row["task"][local], template),
                         list(row["positive"][local]), [], None, None,
                         torch.tensor([float(x) for x in scores[scope]], dtype=torch.float32),
                         list(row["query"][local]))
    negatives_all = list(row["negative"]) if hard_negatives else []
    use_negatives = any(negatives_all)
    negatives_local = negatives_all[local] if use_negatives else []
    positives_scope = list(row["positive"][scope])
    docs = positives_scope + (negatives_all[scope] if use_negatives else [])
    return StepTexts(
        queries=format_queries(row["query"][local], row["task"][local], template),
        positives=list(row["positive"][local]),
        negatives=negatives_local,
        negative_valid=torch.tensor([bool(n) for n in negatives_all[scope]]) if use_negatives else None,
        false_negatives=false_negative_mask(positives_scope, docs) if mask_false_negatives else None,
        raw_queries=list(row["query"][local]),
    )


class RandomState:
    """The torch random state (CPU and the current accelerator) at one point, to replay a forward exactly."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def length_chunks(embedder, texts: Sequence[str], size: int | None) -> list[tuple[list[int], dict]]:
    """Texts tokenised and grouped by length into padded chunks of at most ``size``: (row indices, tensors).

    Grouping by length cuts padding (on CPU, Gemma 270M fwd+bwd of 64 SNLI premises: 9.1 s in one batch, 4.9 s in
    length-sorted chunks of 16). Every worker gets the same number of chunks for the same number of texts.
    """
    if not texts:
        return []
    ids = embedder.token_ids(list(texts))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    size = size or len(order)
    pad_id = embedder.tokenizer.pad_token_id
    return [(order[i:i + size], pad([ids[j] for j in order[i:i + size]], pad_id, "right"))
            for i in range(0, len(order), size)]


def _unsort(parts: list[torch.Tensor], chunks) -> torch.Tensor:
    """Chunk outputs (in length order) back in row order; differentiable."""
    stacked = torch.cat(parts)
    index = torch.tensor([i for rows, _ in chunks for i in rows], dtype=torch.long, device=stacked.device)
    return torch.empty_like(stacked).index_copy(0, index, stacked)


def teacher_embeddings(teacher, texts: StepTexts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A frozen teacher's vectors of the step's raw queries, positives and negatives (zeros for a missing
    negative, which the loss masks out), without gradients."""
    def embed(batch: list[str]) -> torch.Tensor:
        present = [i for i, t in enumerate(batch) if t]
        out = torch.zeros((len(batch), teacher.dimension), dtype=torch.float32)
        if present:
            out[present] = torch.from_numpy(teacher.encode([batch[i] for i in present], batch_size=64))
        return out

    queries = texts.raw_queries if texts.raw_queries is not None else texts.queries
    return embed(queries), embed(texts.positives), embed(texts.negatives) if texts.negatives else None


@dataclass
class StepResult:
    loss: float
    tokens: int  # non-padding tokens embedded by this worker (once, even with caching)


def train_step(engine, embedder, texts: StepTexts, loss: Loss, chunk_size: int | None = None,
               gradient_cache: bool = False, teacher=None) -> StepResult:
    """Forward and backward of one step under ``loss`` (gradients accumulated in the engine; the caller calls
    ``engine.step``). ``texts`` come from ``prepare`` with the loss's ``cross_device`` and ``mask_false_negatives``.

    Texts are embedded in length-grouped chunks of ``chunk_size``; with ``gradient_cache`` the chunks are first
    embedded without a graph, so memory holds one chunk's activations whatever the batch size. ``teacher``: a
    frozen embedder whose vectors of the same texts the loss distils from (``ScoreDistillation``).
    """
    groups = [texts.queries, texts.positives] + ([texts.negatives] if texts.negatives else [])
    chunked = [length_chunks(embedder, g, chunk_size) for g in groups]
    tokens = int(sum(int(b["attention_mask"].sum()) for group in chunked for _, b in group))
    scale = loss.backward_scale()
    device = engine.device

    taught = None
    if teacher is not None:
        taught = tuple(t if t is None else t.to(device) for t in teacher_embeddings(teacher, texts))

    def loss_of(embs: list[torch.Tensor]) -> torch.Tensor:
        n = embs[2] if len(embs) > 2 else None
        return loss(LossInputs(embs[0], embs[1], n, texts.negative_valid, texts.false_negatives, texts.scores,
                               taught))

    if not gradient_cache:
        embs = [_unsort([engine.embed(b) for _, b in group], group) for group in chunked]
        value = loss_of(embs)
        engine.backward(value * scale, boundary=True)
        return StepResult(float(value.detach()), tokens)

    # Pass 1: embeddings without a graph, remembering each chunk's random state.
    states, reps = [], []
    with torch.no_grad():
        for group in chunked:
            group_states, parts = [], []
            for _, b in group:
                group_states.append(RandomState(device))
                parts.append(engine.embed(b))
            states.append(group_states)
            reps.append(_unsort(parts, group))
    leaves = [r.detach().requires_grad_() for r in reps]
    value = loss_of(leaves)
    (value * scale).backward()  # gradients of the loss with respect to the embeddings only
    # Pass 2: re-embed chunk by chunk with a graph, back-propagating each chunk's share of the gradient.
    last = (len(chunked) - 1, len(chunked[-1]) - 1)
    for gi, group in enumerate(chunked):
        for ci, (rows, b) in enumerate(group):
            states[gi][ci].restore()
            emb = engine.embed(b)
            grad = leaves[gi].grad[torch.tensor(rows, dtype=torch.long, device=emb.device)]
            engine.backward(torch.sum(emb * grad), boundary=(gi, ci) == last)
    return StepResult(float(value.detach()), tokens)
