"""The request journal: a write-ahead record of every answer a backend sent, so that a rerun never pays twice.

Each actor appends one JSON line per finished request (the parsed row with its drop reason and the tokens the
answer cost) to its own file under ``<run_dir>/synthetic/journal/``, as soon as the answer arrives and before the
driver sees it. A driver killed at any point therefore leaves a journal that says which requests were answered,
what they cost and what they held; the rerun

- never sends a request again whose answer was received (valid or dropped for a reason that would repeat),
- writes the valid rows that had reached the journal but not a shard,
- counts tokens, cost and drops from the journal (one outcome per request id), so nothing is counted twice and
  ``budget_usd`` holds across kill and resume,
- sends again only the requests that never got an answer (timeouts, connection errors, 429/5xx after retries).

One double charge is beyond any client: an answer already on the wire when its process died was billed by the API
but never reached the journal, so the rerun asks it again. At most the requests then in flight (``actors`` x
``concurrency``) are paid twice.

Records are rows that :func:`ray_e5.generate.completions.finish` made writable, and the writer still never fails
on one: text that UTF-8 cannot hold (a lone surrogate) is written as a JSON escape, and a reader skips any line it
cannot parse or whose counts it cannot read.

On a local run directory each line is flushed as it is written; an object store has no append, so there each
writer puts one object per batch of answers (a kill then loses at most the answers of the batches in flight).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow.fs as pafs

from ray_e5 import storage
from ray_e5.generate.backends import is_transient, token_count

JOURNAL_DIR = "journal"


class JournalWriter:
    """Appends records for one process (an actor, or the driver for vLLM) to its own journal file(s)."""

    def __init__(self, out_dir: str):
        self.dir = storage.join(out_dir, JOURNAL_DIR)
        storage.makedirs(self.dir)
        self.fs, self.path = storage.resolve(self.dir)
        self.name = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.buffer: list[str] = []
        self.part = 0
        self.handle = (open(os.path.join(self.path, f"{self.name}.jsonl"), "a", encoding="utf-8") if self.local
                       else None)

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: escaped, so the line is valid UTF-8 and reads back the same
            line = json.dumps(record, ensure_ascii=True) + "\n"
        if self.handle is not None:
            self.handle.write(line)
            self.handle.flush()
        else:
            self.buffer.append(line)

    def flush(self) -> None:
        if self.handle is not None or not self.buffer:
            return
        with self.fs.open_output_stream(f"{self.path}/{self.name}-{self.part:05d}.jsonl") as out:
            out.write("".join(self.buffer).encode())
        self.buffer, self.part = [], self.part + 1

    def close(self) -> None:
        self.flush()
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def read_journal(out_dir: str) -> Iterator[dict]:
    """Every record under ``<out_dir>/journal`` (a line torn by a kill is skipped)."""
    uri = storage.join(out_dir, JOURNAL_DIR)
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    for info in sorted(infos, key=lambda i: i.path):
        if not info.path.endswith(".jsonl"):
            continue
        with fs.open_input_stream(info.path) as stream:
            text = stream.read().decode("utf-8", errors="replace")
        for line in text.split("\n"):  # (not splitlines: U+2028, U+0085 in a row's text are not line ends)
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # torn by a kill (or not ours)
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                yield record


@dataclass
class JournalState:
    """What the journal says, folded to one outcome per request id (an answer wins over a transport failure)."""

    outcome: dict[str, str] = field(default_factory=dict)  # example id -> drop reason ("" = a valid answer)
    brainstorm: dict[str, dict] = field(default_factory=dict)  # brainstorm id -> its last answered record
    unwritten: dict[str, dict] = field(default_factory=dict)  # valid example rows not (yet) in a shard
    prompt_tokens: int = 0
    completion_tokens: int = 0
    records: int = 0

    def answered(self, request_id: str) -> bool:
        """True when the request got an answer: sending it again would pay twice for the same outcome."""
        reason = self.outcome.get(request_id)
        return reason is not None and not is_transient(reason)

    def note(self, record: dict) -> None:
        """Fold in one record (a row this run received, or one read back from the journal)."""
        self.records += 1
        self.prompt_tokens += token_count(record.get("prompt_tokens")) or 0
        self.completion_tokens += token_count(record.get("completion_tokens")) or 0
        reason = record.get("drop") or ""
        if not isinstance(reason, str):
            reason = "request_bad_response"
        if record.get("phase") == "brainstorm":
            if not is_transient(reason) or record["id"] not in self.brainstorm:
                self.brainstorm[record["id"]] = record
            return
        previous = self.outcome.get(record["id"])
        if previous is None or is_transient(previous) or (previous and not reason):
            self.outcome[record["id"]] = reason


def answered_rows(out_dir: str, phase: str) -> dict[str, dict]:
    """The journaled rows of ``phase`` whose request got an answer, by id: what a restarted actor hands back for a
    batch Ray retries, instead of paying for it again."""
    rows: dict[str, dict] = {}
    for record in read_journal(out_dir):
        if record.get("phase") == phase and not is_transient(record.get("drop") or ""):
            rows[record["id"]] = record
    return rows


def load_state(out_dir: str, written: set[str]) -> JournalState:
    """The journal folded; valid rows that never reached a shard are kept (whole) for the rerun to write."""
    state = JournalState()
    for record in read_journal(out_dir):
        state.note(record)
        if record.get("phase") == "example" and not record.get("drop") and record["id"] not in written:
            state.unwritten[record["id"]] = record
    return state
