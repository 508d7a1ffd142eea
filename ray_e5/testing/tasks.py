"""Small task folders in the layouts of ../shared/data, for tests and benchmarks.

The toy tasks are built so that any deterministic encoder reaches a known score with instructions off: every
query's relevant document (and every bitext partner, every positive pair) is the *same text*, so cosine
similarity 1.0 singles it out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors that capture meaning.",
    "Large language models write synthetic training data.",
    "Contrastive learning pulls positives together.",
    "The cat sleeps on a warm windowsill.",
    "Rockets burn fuel to push exhaust downward.",
    "A child reads a book about dinosaurs.",
    "The stock market fell sharply on Monday.",
    "Fresh bread smells wonderful in the morning.",
    "Mountains are covered with snow in winter.",
    "She plays the violin in an orchestra.",
]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` to ``path`` as JSON lines (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_task_json(folder: Path, type_: str, **extra: Any) -> Path:
    """Write a task folder's ``task.json`` (``type``, ``language`` en unless ``extra`` says, any ``extra`` keys), as
    the local evaluation tasks read it; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"type": type_, "language": "en", **extra}))
    return folder


def toy_sts(folder: Path) -> Path:
    """Pairs of a sentence with itself score 5, with another sentence 0: any encoder ranks them right."""
    rows = [{"sentence1": s, "sentence2": s, "score": 5.0} for s in SENTENCES[:6]]
    rows += [{"sentence1": a, "sentence2": b, "score": 0.0} for a, b in zip(SENTENCES[6:], SENTENCES[:6])]
    write_jsonl(folder / "test.jsonl", rows)
    return write_task_json(folder, "sts", min_score=0, max_score=5)


def toy_retrieval(folder: Path) -> Path:
    """BEIR layout; each query's one relevant document has the query's exact text."""
    write_jsonl(folder / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": s} for i, s in enumerate(SENTENCES)])
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": s} for i, s in enumerate(SENTENCES[:8])])
    qrels = folder / "qrels" / "test.tsv"
    qrels.parent.mkdir(parents=True, exist_ok=True)
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(8)))
    return write_task_json(folder, "retrieval", instruction_hint="Given a sentence, retrieve the same sentence")


def toy_reranking(folder: Path) -> Path:
    """Each query's one positive is the query's own text, among four other sentences."""
    rows = [{"query": s, "positive": [s], "negative": [t for t in SENTENCES if t != s][:4]} for s in SENTENCES[:6]]
    write_jsonl(folder / "test.jsonl", rows)
    return write_task_json(folder, "reranking")


def toy_pair_classification(folder: Path) -> Path:
    """Pairs of a sentence with itself are label 1, with another sentence label 0."""
    rows = [{"sentence1": s, "sentence2": s, "labels": 1} for s in SENTENCES[:6]]
    rows += [{"sentence1": a, "sentence2": b, "labels": 0} for a, b in zip(SENTENCES[6:], SENTENCES[:6])]
    write_jsonl(folder / "test.jsonl", rows)
    return write_task_json(folder, "pair_classification")


def toy_bitext(folder: Path) -> Path:
    """Two language-pair subsets; each line's partner is the same text."""
    for pair in ("deu-eng", "fra-eng"):
        write_jsonl(folder / f"{pair}.jsonl", [{"sentence1": s, "sentence2": s} for s in SENTENCES])
    return write_task_json(folder, "bitext_mining", language=["deu", "fra", "eng"])


def toy_classification(folder: Path) -> Path:
    """Two labels, test only (the probe trains on a seeded half)."""
    rows = [{"text": f"{s} ({i})", "label": "music" if "play" in s or "violin" in s or "guitar" in s else "other"}
            for i in range(4) for s in SENTENCES]
    write_jsonl(folder / "test.jsonl", rows)
    return write_task_json(folder, "classification")


TOY_TASKS = {"toy_sts": toy_sts, "toy_retrieval": toy_retrieval, "toy_reranking": toy_reranking,
             "toy_pair": toy_pair_classification, "toy_bitext": toy_bitext, "toy_classification": toy_classification}


def toy_tasks(root: str | Path, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Write the toy task folders under ``root``; returns name -> folder."""
    root = Path(root)
    return {name: TOY_TASKS[name](root / name) for name in (names or TOY_TASKS)}

