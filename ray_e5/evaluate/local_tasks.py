"""mteb tasks built from local folders, so evaluation runs with no hub.

A folder holds ``task.json`` (``type``, ``language``, optional ``instruction_hint``, ``min_score``/``max_score``)
and its data in the layouts of ``../shared/data`` (column names follow MTEB's datasets):

- ``sts``: ``<split>.jsonl`` rows ``{sentence1, sentence2, score}``; ``<split>.<subset>.jsonl`` for subsets
  (languages), e.g. ``test.de.jsonl``.
- ``retrieval``: BEIR: ``corpus.jsonl`` ``{_id, title, text}``, ``queries.jsonl`` ``{_id, text}``,
  ``qrels/<split>.tsv`` (``query-id  corpus-id  score`` with a header line).
- ``reranking``: ``<split>.jsonl`` rows ``{query, positive: [...], negative: [...]}`` (MTEB's reranking layout).
- ``classification``: ``{text, label}`` in ``train.jsonl`` and ``<split>.jsonl``; with no ``train.jsonl`` the
  logistic-regression probe trains on a seeded half of the evaluated file and is scored on the other half.
- ``pair_classification``: ``<split>.jsonl`` rows ``{sentence1, sentence2, labels}``.
- ``bitext_mining``: ``<split>.jsonl`` or one ``<lang>-<lang>.jsonl`` per pair (each a subset), rows
  ``{sentence1, sentence2}`` aligned line by line.

Each task class subclasses mteb's own task class and overrides ``load_data`` only, so every score comes from
mteb's evaluators. Problems (missing files, unknown type, empty split, bad rows) raise :class:`LocalTaskError`
naming the task.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining

from ray_e5.settings import ConfigError
from ray_e5.evaluate.config import LOCAL_TYPES

#: local type -> (mteb task type, mteb main score)
MTEB_TYPES = {
    "sts": ("STS", "cosine_spearman"),
    "retrieval": ("Retrieval", "ndcg_at_10"),
    "reranking": ("Reranking", "map_at_1000"),
    "classification": ("Classification", "accuracy"),
    "pair_classification": ("PairClassification", "max_ap"),
    "bitext_mining": ("BitextMining", "f1"),
}
_ISO2 = {"en": "eng", "de": "deu", "es": "spa", "fr": "fra", "it": "ita", "ja": "jpn", "nl": "nld", "pl": "pol",
         "pt": "por", "ru": "rus", "zh": "zho", "ar": "ara", "ko": "kor", "tr": "tur", "sv": "swe", "da": "dan",
         "fi": "fin", "no": "nor", "cs": "ces", "hu": "hun", "el": "ell", "he": "heb", "hi": "hin", "id": "ind",
         "vi": "vie", "th": "tha", "uk": "ukr", "ro": "ron", "bg": "bul", "fa": "fas"}


class LocalTaskError(ConfigError):
    """A local task folder that cannot be read; the message names the task and what is wrong."""


def _iso3(code: str) -> str:
    """An mteb-valid ISO 639-3 code for a language code; ``und`` when it is not one mteb knows."""
    from mteb.languages import ISO_TO_LANGUAGE

    code = _ISO2.get(code.lower(), code.lower())
    return code if code in ISO_TO_LANGUAGE else "und"


class _LocalTask:
    """Mixin: metadata built from the folder, data read from it by ``load_data``."""

    local_type: str

    def __init__(self, folder: str | Path, *, name: str | None = None, split: str = "test",
                 subsets: list[str] | None = None, max_samples: int | None = None, max_corpus: int | None = None,
                 seed: int = 42, main_score: str | None = None, info: dict[str, Any] | None = None):
        self.folder = Path(folder).resolve()
        self.task_name = name or self.folder.name
        self.split = split
        self.max_samples = max_samples
        self.max_corpus = max_corpus
        self.info = info if info is not None else read_task_json(self.folder, self.task_name)
        self.subset_files = self._subset_files(subsets)
        mteb_type, default_score = MTEB_TYPES[self.local_type]
        hint = self.info.get("instruction_hint")
        self.metadata = TaskMetadata(
            name=self.task_name,
            description=f"local {self.local_type} task read from {self.folder}",
            dataset={"path": str(self.folder), "revision": _files_fingerprint(self.folder)},
            type=mteb_type,
            category="t2t",
            modalities=["text"],
            eval_splits=[split],
            eval_langs=self._eval_langs(),
            main_score=main_score or default_score,
            prompt=hint if isinstance(hint, str) and hint else None,
        )
        super().__init__(seed=seed)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _error(self, message: str) -> LocalTaskError:
        return LocalTaskError(f"task {self.task_name!r} ({self.folder}): {message}")

    def _subset_files(self, wanted: list[str] | None) -> dict[str, Path]:
        """Subset name -> data file of the evaluated split (``default`` for a single file)."""
        single = self.folder / f"{self.split}.jsonl"
        if single.is_file():
            found = {"default": single}
        else:
            found = {p.name[len(self.split) + 1:-len(".jsonl")]: p
                     for p in sorted(self.folder.glob(f"{self.split}.*.jsonl"))}
        if not found:
            listed = sorted(p.name for p in self.folder.glob("*.jsonl"))
            raise self._error(f"no data for split {self.split!r}: expected {single.name} or "
                              f"{self.split}.<subset>.jsonl; the folder holds {listed or 'no .jsonl files'}")
        return self._select(found, wanted)

    def _select(self, found: dict[str, Path], wanted: list[str] | None) -> dict[str, Path]:
        if not wanted:
            return found
        unknown = [s for s in wanted if s not in found]
        if unknown:
            raise self._error(f"unknown subsets {unknown}; available: {sorted(found)}")
        return {s: found[s] for s in wanted}

    def _eval_langs(self) -> list[str] | dict[str, list[str]]:
        if list(self.subset_files) == ["default"]:
            lang = self.info.get("language", "en")
            return [_iso3(lang if isinstance(lang, str) else "und")]
        return {s: [_iso3(part) for part in s.split("-")] for s in self.subset_files}

    def _rows(self, path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
        if not path.is_file():
            raise self._error(f"missing file {path.name}")
        rows = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise self._error(f"{path.name} line {lineno} is not JSON: {err}") from None
                missing = [k for k in required if k not in row]
                if missing:
                    raise self._error(f"{path.name} line {lineno} lacks {missing}; rows need {list(required)}")
                rows.append(row)
        if not rows:
            raise self._error(f"split {self.split!r} is empty ({path.name} has no rows)")
        return rows

    def _sample(self, items: list, n: int | None, salt: str = "") -> list:
        """A seeded subsample of ``n`` items, kept in file order (all items when n is None or larger)."""
        if n is None or n >= len(items):
            return items
        keep = sorted(random.Random(f"{self.seed}:{self.task_name}:{salt}").sample(range(len(items)), n))
        return [items[i] for i in keep]

    def _datasets(self, build) -> None:
        """Fill ``self.dataset`` as mteb stores it: {subset: {split: data}}."""
        self.dataset = {subset: build(subset, path) for subset, path in self.subset_files.items()}
        self.data_loaded = True

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self._load()
        self.data_loaded = True

    def _load(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


class LocalSTSTask(_LocalTask, AbsTaskSTS):
    local_type = "sts"

    def __init__(self, folder, **kwargs):
        super().__init__(folder, **kwargs)
        self.min_score = self.info.get("min_score", 0)
        self.max_score = self.info.get("max_score", 5)

    def _load(self) -> None:
        from datasets import Dataset, DatasetDict

        def build(subset, path):
            rows = self._sample(self._rows(path, ("sentence1", "sentence2", "score")), self.max_samples, subset)
            data = {k: [r[k] for r in rows] for k in ("sentence1", "sentence2")}
            data["score"] = [float(r["score"]) for r in rows]
            return DatasetDict({self.split: Dataset.from_dict(data)})

        self._datasets(build)


class LocalPairClassificationTask(_LocalTask, AbsTaskPairClassification):
    local_type = "pair_classification"

    def _load(self) -> None:
        from datasets import Dataset, DatasetDict

        def build(subset, path):
            rows = self._sample(self._rows(path, ("sentence1", "sentence2", "labels")), self.max_samples, subset)
            data = {k: [r[k] for r in rows] for k in ("sentence1", "sentence2")}
            data["labels"] = [int(r["labels"]) for r in rows]
            return DatasetDict({self.split: Dataset.from_dict(data)})

        self._datasets(build)


class LocalBitextMiningTask(_LocalTask, AbsTaskBitextMining):
    local_type = "bitext_mining"

    def _subset_files(self, wanted):
        single = self.folder / f"{self.split}.jsonl"
        if single.is_file():
            return self._select({"default": single}, wanted)
        found = {p.stem: p for p in sorted(self.folder.glob("*-*.jsonl"))}
        if not found:
            raise self._error(f"no data for split {self.split!r}: expected {single.name} or one "
                              "<lang>-<lang>.jsonl file per language pair")
        return self._select(found, wanted)

    def _load(self) -> None:
        from datasets import Dataset, DatasetDict

        def build(subset, path):
            rows = self._sample(self._rows(path, ("sentence1", "sentence2")), self.max_samples, subset)
            return DatasetDict({self.split: Dataset.from_dict(
                {k: [str(r[k]) for r in rows] for k in ("sentence1", "sentence2")})})

        self._datasets(build)


class LocalClassificationTask(_LocalTask, AbsTaskClassification):
    local_type = "classification"

    def _load(self) -> None:
        from datasets import Dataset, DatasetDict

        train_file = self.folder / "train.jsonl"

        def build(subset, path):
            rows = self._rows(path, ("text", "label"))
            if train_file.is_file() and self.split != "train":
                train = self._rows(train_file, ("text", "label"))
                test = self._sample(rows, self.max_samples, subset)
            else:
                # Only the evaluated file: a seeded half trains the probe, the other half is scored.
                order = list(range(len(rows)))
                random.Random(f"{self.seed}:{self.task_name}:train").shuffle(order)
                half = len(rows) // 2
                train = [rows[i] for i in sorted(order[:half])]
                test = self._sample([rows[i] for i in sorted(order[half:])], self.max_samples, subset)
                if not train or not test:
                    raise self._error(f"{path.name} has {len(rows)} rows: too few to split into train and test")

            # Labels become class ids (sorted names), as mteb's hub datasets store them: its binary metrics
            # (average precision) expect 0/1.
            names = sorted({str(r["label"]) for r in train + test})
            ids = {name: i for i, name in enumerate(names)}
            self.label_names = names

            def as_dataset(items):
                return Dataset.from_dict({"text": [str(r["text"]) for r in items],
                                          "label": [ids[str(r["label"])] for r in items]})

            return DatasetDict({"train": as_dataset(train), self.split: as_dataset(test)})

        self._datasets(build)


class LocalRetrievalTask(_LocalTask, AbsTaskRetrieval):
    """BEIR layout. With ``max_samples`` only that many queries are kept; with ``max_corpus`` the corpus is cut to
    that many documents, always keeping every document relevant to a kept query."""

    local_type = "retrieval"

    def _subset_files(self, wanted):
        qrels = self.folder / "qrels" / f"{self.split}.tsv"
        for needed in (self.folder / "corpus.jsonl", self.folder / "queries.jsonl", qrels):
            if not needed.is_file():
                raise self._error(f"missing file {needed.relative_to(self.folder)} (BEIR layout: corpus.jsonl, "
                                  f"queries.jsonl, qrels/<split>.tsv)")
        return self._select({"default": qrels}, wanted)

    def _qrels(self, path: Path) -> dict[str, dict[str, int]]:
        relevant: dict[str, dict[str, int]] = defaultdict(dict)
        with path.open(encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter="\t")
            for lineno, row in enumerate(reader, 1):
                if not row or (lineno == 1 and not row[-1].strip().lstrip("-").isdigit()):
                    continue  # blank line or header
                if len(row) < 3:
                    raise self._error(f"qrels/{path.name} line {lineno}: expected query-id, corpus-id, score")
                relevant[row[0]][row[1]] = int(float(row[2]))
        if not relevant:
            raise self._error(f"split {self.split!r} is empty (qrels/{path.name} has no judgements)")
        return dict(relevant)

    def _load(self) -> None:
        from datasets import Dataset

        relevant = self._qrels(self.subset_files["default"])
        queries = [q for q in self._rows(self.folder / "queries.jsonl", ("_id", "text")) if str(q["_id"]) in relevant]
        if not queries:
            raise self._error(f"no query of queries.jsonl appears in qrels/{self.split}.tsv")
        queries = self._sample(queries, self.max_samples, "queries")
        query_ids = {str(q["_id"]) for q in queries}
        relevant = {q: docs for q, docs in relevant.items() if q in query_ids}
        corpus = self._rows(self.folder / "corpus.jsonl", ("_id", "text"))
        if self.max_corpus is not None and self.max_corpus < len(corpus):
            needed = {d for docs in relevant.values() for d, s in docs.items() if s > 0}
            keep = [c for c in corpus if str(c["_id"]) in needed]
            others = [c for c in corpus if str(c["_id"]) not in needed]
            corpus = keep + self._sample(others, max(0, self.max_corpus - len(keep)), "corpus")
        doc_ids = {str(c["_id"]) for c in corpus}
        if not any(d in doc_ids for docs in relevant.values() for d in docs):
            raise self._error("no document judged in the qrels is in corpus.jsonl")
        self.dataset = {"default": {self.split: {
            "corpus": Dataset.from_dict({"id": [str(c["_id"]) for c in corpus],
                                         "title": [str(c.get("title") or "") for c in corpus],
                                         "text": [str(c["text"]) for c in corpus]}),
            "queries": Dataset.from_dict({"id": [str(q["_id"]) for q in queries],
                                          "text": [str(q["text"]) for q in queries]}),
            "relevant_docs": relevant,
            "top_ranked": None,
        }}}


class LocalRerankingTask(_LocalTask, AbsTaskRetrieval):
    """MTEB's reranking layout: each row is a query with its candidate positives and negatives."""

    local_type = "reranking"

    def _load(self) -> None:
        from datasets import Dataset

        def build(subset, path):
            rows = self._sample(self._rows(path, ("query", "positive", "negative")), self.max_samples, subset)
            corpus, queries, relevant, top = [], [], {}, {}
            for i, row in enumerate(rows):
                if not row["positive"] or not row["negative"]:
                    continue  # as mteb does: a query needs a positive and a negative to be ranked
                qid = f"q{i}"
                queries.append({"id": qid, "text": str(row["query"])})
                relevant[qid], top[qid] = {}, []
                for kind, docs, score in (("p", row["positive"], 1), ("n", row["negative"], 0)):
                    for j, doc in enumerate(docs):
                        did = f"{qid}-{kind}{j}"
                        corpus.append({"id": did, "title": "", "text": str(doc)})
                        relevant[qid][did] = score
                        top[qid].append(did)
            if not queries:
                raise self._error(f"no row of {path.name} has both a positive and a negative")
            return {self.split: {"corpus": Dataset.from_list(corpus), "queries": Dataset.from_list(queries),
                                 "relevant_docs": relevant, "top_ranked": top}}

        self._datasets(build)


TASK_CLASSES: dict[str, type[_LocalTask]] = {
    "sts": LocalSTSTask,
    "retrieval": LocalRetrievalTask,
    "reranking": LocalRerankingTask,
    "classification": LocalClassificationTask,
    "pair_classification": LocalPairClassificationTask,
    "bitext_mining": LocalBitextMiningTask,
}
assert set(TASK_CLASSES) == set(LOCAL_TYPES)


def read_task_json(folder: Path, name: str) -> dict[str, Any]:
    where = f"task {name!r} ({folder})"
    if not folder.is_dir():
        raise LocalTaskError(f"{where}: folder does not exist")
    path = folder / "task.json"
    if not path.is_file():
        raise LocalTaskError(f"{where}: missing task.json (it names the task type: one of {', '.join(LOCAL_TYPES)})")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LocalTaskError(f"{where}: task.json is not valid JSON: {err}") from None
    if not isinstance(info, dict) or "type" not in info:
        raise LocalTaskError(f"{where}: task.json needs a `type`: one of {', '.join(LOCAL_TYPES)}")
    if info["type"] not in TASK_CLASSES:
        raise LocalTaskError(f"{where}: unknown task type {info['type']!r}; accepted: {', '.join(LOCAL_TYPES)}")
    return info


def _files_fingerprint(folder: Path) -> str:
    """A short digest of the folder's file names, sizes and modification times (the task's 'revision')."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{int(stat.st_mtime)}\n".encode())
    return digest.hexdigest()[:16]


def load_local_task(folder: str | Path, *, name: str | None = None, split: str = "test",
                    subsets: list[str] | None = None, max_samples: int | None = None,
                    max_corpus: int | None = None, seed: int = 42, main_score: str | None = None,
                    load: bool = True):
    """An mteb task for a local folder, its data loaded (``load=False`` defers reading to ``load_data``)."""
    folder = Path(folder).expanduser().resolve()
    task_name = name or folder.name
    info = read_task_json(folder, task_name)
    cls = TASK_CLASSES[info["type"]]
    task = cls(folder, name=task_name, split=split, subsets=subsets, max_samples=max_samples,
               max_corpus=max_corpus, seed=seed, main_score=main_score, info=info)
    if load:
        task.load_data()
    return task
