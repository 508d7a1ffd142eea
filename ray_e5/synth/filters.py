"""Quality filters on generated rows: exact and near-duplicates (MinHash LSH) and evaluation-set contamination
(word n-gram overlap with the evaluation texts, as in the paper's appendix)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ray_e5 import runs

_WORD = re.compile(r"\w+", re.U)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Deduplicator:
    def __init__(self, threshold: float, num_perm: int = 64):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.exact: set[str] = set()
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.count = 0

    def _minhash(self, text: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm)
        words = _words(text)
        for shingle in {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}:
            m.update(shingle.encode())
        return m

    def check(self, row: dict) -> str | None:
        """None when new (and remember it); else the drop reason."""
        text = f"{row['query']}\n{row['positive']}"
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in self.exact:
            return "duplicate_exact"
        m = self._minhash(text)
        if self.lsh.query(m):
            return "duplicate_near"
        self.exact.add(digest)
        self.lsh.insert(str(self.count), m)
        self.count += 1
        return None

    def seed_from(self, out_dir: str) -> None:
        """Remember the rows an earlier run already wrote."""
        import pyarrow.parquet as pq
        from pyarrow import fs as pafs

        fs, path = runs.resolve(out_dir)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            if info.path.endswith(".parquet"):
                for row in pq.read_table(info.path, columns=["query", "positive"], filesystem=fs).to_pylist():
                    self.check(row)


class ContaminationFilter:
    """Drops rows sharing any word n-gram with the given evaluation files (JSONL; every string field is read)."""

    def __init__(self, paths: list[str], n: int):
        self.n = n
        self.grams: set[int] = set()
        for path in paths:
            files = [Path(path)] if Path(path).is_file() else sorted(Path(path).rglob("*.jsonl"))
            if not files:
                raise FileNotFoundError(f"generate.contamination_paths: {path!r} holds no .jsonl files")
            for file in files:
                with file.open() as fh:
                    for line in fh:
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        for value in record.values() if isinstance(record, dict) else []:
                            if isinstance(value, str):
                                self.grams.update(self._grams(value))

    def _grams(self, text: str) -> set[int]:
        words = _words(text)
        return {hash(" ".join(words[i:i + self.n])) for i in range(len(words) - self.n + 1)}

    def check(self, row: dict) -> str | None:
        if not self.grams:
            return None
        for key in ("query", "positive", "negative"):
            if self._grams(row[key]) & self.grams:
                return "contaminated"
        return None
