"""Quality filters on generated rows: exact and near-duplicates (MinHash LSH, datasketch) and evaluation-set
contamination (word n-gram overlap with the evaluation texts, as in the paper's appendix: case and spacing are
ignored; a text shorter than n words is compared whole).

The evaluation texts are named relative to the config's ``data_dir`` (``generate.contamination_paths``), or by
default are the evaluation tasks of the same config (``evaluate.tasks`` folders, their non-train files); they are
read through pyarrow filesystems, so they may live in an object store like the rest of the run."""

from __future__ import annotations

import hashlib
import json
import io
import re
from pathlib import PurePosixPath

import pyarrow.fs as pafs

from ray_e5 import storage

_WORD = re.compile(r"\w+", re.U)
EVAL_SUFFIXES = (".jsonl", ".json", ".txt", ".tsv", ".parquet")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Deduplicator:
    """Drops a row whose (query, positive) pair repeats one seen before, exactly or nearly (Jaccard similarity of
    word 3-gram shingles estimated by MinHash at or above ``threshold``)."""

    def __init__(self, threshold: float, num_perm: int = 64):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.exact: set[str] = set()
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if threshold < 1 else None
        self.count = 0

    def _minhash(self, text: str):
        from datasketch import MinHash

        w = words(text)
        shingles = {" ".join(w[i:i + 3]) for i in range(max(1, len(w) - 2))} or {text}
        m = MinHash(num_perm=self.num_perm)
        m.update_batch([s.encode() for s in shingles])
        return m

    def check(self, row: dict) -> str | None:
        """None when new (and remember it); else the drop reason."""
        text = f"{row['query']}\n{row['positive']}"
        digest = hashlib.sha256(" ".join(words(text)).encode()).hexdigest()
        if digest in self.exact:
            return "duplicate_exact"
        m = None
        if self.lsh is not None:
            m = self._minhash(text)
            if self.lsh.query(m):
                return "duplicate_near"
        self.exact.add(digest)
        if m is not None:
            self.lsh.insert(str(self.count), m)
        self.count += 1
        return None


def eval_files(path: str, skip_train: bool = False) -> list[tuple[pafs.FileSystem, str]]:
    """The evaluation files under ``path`` (a local path or a URI; a file, or a folder searched recursively):
    (filesystem, path) pairs. ``skip_train`` leaves out ``train*`` files and ``task.json`` (a task folder's
    training split is not what a benchmark scores)."""
    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return [(fs, p)]
    if info.type != pafs.FileType.Directory:
        return []
    found = []
    for f in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        name = PurePosixPath(f.path).name
        if not f.is_file or not name.endswith(EVAL_SUFFIXES):
            continue
        if skip_train and (name.startswith("train") or name == "task.json" or "/qrels/" in f.path):
            continue
        found.append((fs, f.path))
    return sorted(found, key=lambda x: x[1])


def contamination_uris(config, settings) -> tuple[list[str], bool]:
    """Where the evaluation texts are: ``generate.contamination_paths`` under ``data_dir``, else the folders of
    this config's ``evaluate.tasks`` (MTEB names, which load from a hub, are not read here). Returns the URIs and
    whether they are the default (task folders)."""
    data_dir = getattr(config, "data_dir", None) or "."
    if settings.contamination_paths:
        return [storage.data_uri(data_dir, p) for p in settings.contamination_paths], False
    tasks = getattr(getattr(config, "evaluate", None), "tasks", None) or []
    paths = []
    for t in tasks:  # a task entry (its path), or a string: a folder when it holds a "/"
        path = (t if "/" in t else None) if isinstance(t, str) else getattr(t, "path", None)
        if isinstance(path, str):
            paths.append(storage.data_uri(data_dir, path))
    return paths, True


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _texts(file: tuple[pafs.FileSystem, str]):
    fs, path = file
    name = PurePosixPath(path).name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path, filesystem=fs)
        for column in table.column_names:
            if str(table.schema.field(column).type) in ("string", "large_string"):
                yield from (v for v in table.column(column).to_pylist() if v)
        return
    with io.TextIOWrapper(fs.open_input_stream(path), encoding="utf-8", errors="replace") as fh:
        if name.endswith(".json"):
            try:
                yield from _strings(json.load(fh))
            except json.JSONDecodeError:
                return
            return
        for line in fh:
            if name.endswith(".jsonl"):
                try:
                    yield from _strings(json.loads(line))
                except json.JSONDecodeError:
                    continue
            elif name.endswith(".tsv"):
                yield from line.rstrip("\n").split("\t")
            else:
                yield line


class ContaminationFilter:
    """Drops rows that share a word n-gram with an evaluation text (every string field of the given files), or that
    equal a short evaluation text (fewer than n words) up to case, spacing and punctuation."""

    def __init__(self, paths: list[str], n: int, key: str = "generate.contamination_paths", skip_train: bool = False):
        self.n = n
        self.grams: set[bytes] = set()
        self.short: set[bytes] = set()
        self.files = 0
        self.paths = list(paths)
        for path in paths:
            if not storage.is_local(path):  # unreachable store, missing bucket, refused key: named before any work
                storage.check_access(path, key)
            files = eval_files(path, skip_train)
            if not files:
                raise FileNotFoundError(f"{key}: {path!r} is not a file or a folder holding "
                                        f"{', '.join(EVAL_SUFFIXES)} files")
            for file in files:
                self.files += 1
                for text in _texts(file):
                    w = words(text)
                    if len(w) >= self.n:
                        self.grams.update(self._grams(w))
                    elif len(w) >= 3:  # shorter texts match whole; one or two words are too common to count
                        self.short.add(self._key(w))

    @classmethod
    def from_config(cls, config, settings) -> "ContaminationFilter":
        """The filter for a generate run: its contamination sets (by default the config's evaluation task
        folders), after a preflight of the run directory the stage writes to."""
        storage.check_access(config.run_dir, "run_dir", must_exist=False)
        paths, default = contamination_uris(config, settings)
        return cls(paths, settings.contamination_ngram,
                   "evaluate.tasks (the default contamination sets)" if default else "generate.contamination_paths",
                   skip_train=default)

    @staticmethod
    def _key(w: list[str]) -> bytes:
        return hashlib.blake2b(" ".join(w).encode(), digest_size=12).digest()

    def _grams(self, w: list[str]) -> set[bytes]:
        return {self._key(w[i:i + self.n]) for i in range(len(w) - self.n + 1)}

    def check(self, row: dict) -> str | None:
        if not self.grams and not self.short:
            return None
        for key in ("query", "positive", "negative"):
            w = words(row.get(key) or "")
            if not w:
                continue
            if (len(w) >= self.n and not self.grams.isdisjoint(self._grams(w))) or self._key(w) in self.short:
                return "contaminated"
        return None
