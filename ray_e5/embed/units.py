"""The input corpus cut into blocks whose bounds depend only on the input files: the unit of work and of resume.

A block is (file, kind, start, stop): rows ``start:stop`` of a Parquet file (``block_rows`` rows, found from the
footer alone), or the lines of a JSONL file that *begin* in bytes ``start:stop`` (``block_bytes``, Hadoop's
line-split rule: no scan of the file is needed to plan, and every line belongs to exactly one block). A block's
shard is named by a digest of its file, the file's size and its range, so a rerun plans the same blocks, finds
which shards exist and embeds only the others: no row is embedded twice and no id is written twice.

Why not Ray Data's own read blocks: their bounds follow the read parallelism and the cluster's size, so a rerun on
another cluster (or after the autoscaler changed it) would cut the corpus differently and could not tell which rows
a finished shard holds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from ray_e5 import storage as runs
from ray_e5.digest import digest
from ray_e5.settings import ConfigError

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class Block:
    uri: str  # the input file
    format: str  # parquet | jsonl
    start: int  # Parquet: first row; JSONL: first byte a line may begin at
    stop: int  # Parquet: row after the last; JSONL: lines beginning before this byte
    size: int  # the file's size in bytes, in the name: a file replaced by another of another size is new work

    @property
    def name(self) -> str:
        return "part-" + digest({"uri": self.uri, "size": self.size, "format": self.format, "start": self.start,
                                 "stop": self.stop}, length=20)

    def to_dict(self) -> dict:
        return asdict(self)


def _format_of(path: str, wanted: str) -> str | None:
    if wanted != "auto":
        return wanted
    for suffix, fmt in SUFFIXES.items():
        if path.endswith(suffix) or path.endswith(suffix + ".gz"):
            return fmt
    return None


def input_files(uri: str, wanted: str = "auto") -> list[tuple[str, str, int]]:
    """(uri, format, size) of the input: the file itself, or every Parquet / JSONL file under the folder, sorted."""
    info = runs.check_access(uri, "embed.input")
    fs, path = runs.resolve(uri)
    if info.type == pafs.FileType.File:
        fmt = _format_of(path, wanted)
        if fmt is None:
            raise ConfigError(f"embed.input: {uri!r}: not a Parquet or JSONL file name ({', '.join(SUFFIXES)}); "
                              "set embed.format (--set embed.format=jsonl) to read it anyway")
        return [(uri, fmt, info.size)]
    base = uri.rstrip("/")
    found = []
    for item in sorted(fs.get_file_info(pafs.FileSelector(path, recursive=True)), key=lambda i: i.path):
        rel = item.path[len(path.rstrip("/")) + 1:]
        if item.is_file and not rel.split("/")[-1].startswith((".", "_")):
            fmt = _format_of(rel, wanted)
            if fmt is not None:
                found.append((f"{base}/{rel}", fmt, item.size))
    if not found:
        raise ConfigError(f"embed.input: {uri!r}: the folder holds no Parquet or JSONL file")
    return found


def plan(uri: str, wanted: str, block_rows: int, block_bytes: int) -> list[Block]:
    """Every block of the input, in file order."""
    import pyarrow.parquet as pq

    blocks = []
    for file_uri, fmt, size in input_files(uri, wanted):
        if fmt == "parquet":
            fs, path = runs.resolve(file_uri)
            rows = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
            blocks += [Block(file_uri, fmt, s, min(rows, s + block_rows), size) for s in range(0, rows, block_rows)]
        else:
            blocks += [Block(file_uri, fmt, s, min(size, s + block_bytes), size) for s in range(0, size, block_bytes)]
    return blocks


def parquet_rows(block: Block, columns: list[str]) -> pa.Table:
    """Rows ``start:stop`` of the block's Parquet file, only ``columns``, reading only the row groups they lie in."""
    import pyarrow.parquet as pq

    fs, path = runs.resolve(block.uri)
    pf = pq.ParquetFile(path, filesystem=fs)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise MissingColumnError(block.uri, missing, pf.schema_arrow.names)
    groups, first, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > block.start and offset < block.stop:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(block.start - first, block.stop - block.start)


def jsonl_lines(block: Block) -> list[bytes]:
    """The lines that begin inside ``[start, stop)`` of the block's JSONL file; the last one is read to its end,
    past ``stop`` if it runs on (one read of the range, then of the tail)."""
    fs, path = runs.resolve(block.uri)
    with fs.open_input_file(path) as f:
        if block.start > 0:  # a line begins at a byte whose predecessor is a newline: read from that byte
            f.seek(block.start - 1)
            data = f.read(block.stop - block.start + 1)
            first = data.find(b"\n")
            if first < 0:
                return []
            data = data[first + 1:]
        else:
            data = f.read(block.stop)
        while data and not data.endswith(b"\n"):
            more = f.read(1 << 16)
            if not more:
                break
            cut = more.find(b"\n")
            data += more if cut < 0 else more[:cut + 1]
            if cut >= 0:
                break
    lines = data.split(b"\n")
    return lines[:-1] if lines and lines[-1] == b"" else lines


class MissingColumnError(ConfigError):
    def __init__(self, uri: str, missing: list[str], found: list[str]):
        self.missing, self.found = missing, found
        keys = {"id_column": "--id-column", "text_column": "--text-column"}
        super().__init__(f"embed: {uri!r} has no column {', '.join(map(repr, missing))}; the columns found: "
                         f"{', '.join(found) or '(none)'}. Name the right one with {' / '.join(keys.values())} "
                         "(embed.text_column / embed.id_column)")


def jsonl_records(lines: list[bytes]) -> list[dict | None]:
    """Each line as a JSON object, None for a line that is not one (a rejected row); blank lines are dropped."""
    out: list[dict | None] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        out.append(value if isinstance(value, dict) else None)
    return out


__all__ = ["Block", "plan", "input_files", "parquet_rows", "jsonl_lines", "jsonl_records", "MissingColumnError"]
