"""A dominant retrieval corpus encoded by every worker at once, then searched by one.

With several workers, tasks run one per worker, largest first; a corpus that holds most of the evaluation's text
(SciFact's 5183 abstracts against a few thousand STS sentences) then runs on one worker while the others idle, and
two 1-CPU workers take 1.45x the time of one 2-CPU worker. Here such a corpus is cut into one shard per worker,
each shard is embedded by a worker as a small job of its own, and the task itself runs on one worker with the
shards' vectors at hand: mteb's retrieval evaluator asks the encoder for the corpus as usual, and
:class:`PrecomputedDocuments` answers from the vectors (any text it lacks is embedded there and then). The scores are
mteb's, unchanged: only where the document vectors were computed moves.

mteb offers no hook to encode a corpus elsewhere, which is why this is ours. The document texts are built by mteb's
own corpus formatting (``_corpus_to_dict``: title and body joined), so they are exactly the strings mteb will ask for.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def corpus_texts(task: Any) -> list[str]:
    """The document texts of a loaded local retrieval task, as mteb hands them to the encoder; [] for any other."""
    from mteb._create_dataloaders import _corpus_to_dict

    data = getattr(task, "dataset", None)
    if getattr(getattr(task, "metadata", None), "type", None) != "Retrieval" or not isinstance(data, dict):
        return []
    texts: list[str] = []
    for splits in data.values():
        for split in (splits or {}).values():
            corpus = (split or {}).get("corpus") if isinstance(split, dict) else None
            if corpus is None:
                continue
            titles = corpus["title"] if "title" in corpus.column_names else [""] * len(corpus)
            for doc_id, title, text in zip(corpus["id"], titles, corpus["text"]):
                texts.append(_corpus_to_dict({"id": doc_id, "title": title or "", "text": text})["text"])
    return texts


def shards(texts: Sequence[str], n: int) -> list[list[str]]:
    """``texts`` (distinct ones) cut into ``n`` shards of about equal length in characters (longest first, each
    to the lightest shard), so every worker gets the same work; deterministic."""
    unique = sorted(set(texts), key=lambda t: (-len(t), t))
    out: list[list[str]] = [[] for _ in range(max(1, n))]
    load = [0] * len(out)
    for text in unique:
        i = load.index(min(load))
        out[i].append(text)
        load[i] += len(text) + 1
    return out


def worth_sharding(task_chars: int, all_chars: int, workers: int, min_chars: int) -> bool:
    """Shard a task's corpus when there are several workers, the task is large, and it alone holds more than one
    worker's fair share of the evaluation's text (otherwise whole tasks already balance the workers)."""
    return workers > 1 and task_chars >= min_chars and task_chars * workers > all_chars


class PrecomputedDocuments:
    """A model whose un-instructed encodes of known texts come from precomputed vectors (the corpus shards);
    everything else, and any text not among them, goes to the wrapped model."""

    def __init__(self, model: Any, texts: Sequence[Sequence[str]], vectors: Sequence[np.ndarray]):
        self.model = model
        self.vectors: dict[str, np.ndarray] = {}
        for shard, block in zip(texts, vectors):
            if len(shard) != len(block):
                raise ValueError(f"a corpus shard of {len(shard)} texts came back with {len(block)} vectors")
            self.vectors.update(zip(shard, block))
        self.hits = 0

    def __getattr__(self, name: str) -> Any:  # name, dimension, settings, ... of the wrapped model
        return getattr(self.__dict__["model"], name)

    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32) -> np.ndarray:
        if instruction is not None:
            return self.model.encode(texts, instruction=instruction, batch_size=batch_size)
        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if missing:
            self.vectors.update(zip(missing, self.model.encode(missing, instruction=None, batch_size=batch_size)))
        self.hits += len(texts) - len(missing)
        return np.stack([self.vectors[t] for t in texts]) if texts else self.model.encode(texts, batch_size=batch_size)
