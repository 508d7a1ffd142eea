"""One Hugging Face dataset (``hf:``) read as our rows: whether the Hub (or a local copy) can serve it, and its rows
as local files.

An entry with both a path and a Hub name is read from ``data_dir/path`` when that is present, else from the Hub
through ``datasets.load_dataset`` (its cache and ``HF_HUB_OFFLINE`` honoured). Finding every dataset a whole config
names before any work starts is :mod:`ray_e5.datasets`'s, a layer above: this module reads one entry, whichever
section it comes from, and imports no stage's settings.

Hub rows are mapped to our row contract by ``columns`` (ours: theirs) and written once as a Parquet file (training
sources) or a task folder (evaluation tasks) under the ``datasets`` cache, keyed by the dataset's fingerprint, so
the rest of the pipeline reads local files as it does for the mirror, and a rerun finds the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray_e5 import storage
from ray_e5.settings import ConfigError

#: the columns a training row or an evaluation row may carry (ray_e5/data/schema.py, ray_e5/evaluate/local_tasks.py)
ROW_COLUMNS = ("query", "positive", "negative", "sentence1", "sentence2", "score", "labels", "text", "label",
               "task", "kind", "language")
_TRUE = {"1", "on", "yes", "true"}
#: split names of our mirror that the Hub's datasets spell otherwise
HUB_SPLITS = {"dev": "validation"}


def hub_split(split: str | None) -> str | None:
    """The Hub's name of a mirror split (``dev`` is ``validation`` there)."""
    return HUB_SPLITS.get(split, split) if split else split


def hub_offline() -> bool:
    """Whether the Hub must not be asked: HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) set, as huggingface_hub and
    datasets read them."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _cache_dirs() -> tuple[Path, Path]:
    """The ``datasets`` cache and the Hub cache (as datasets.config and huggingface_hub.constants place them)."""
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                     or home / "hub").expanduser()
    return datasets_cache, hub_cache


def hf_cached(repo_id: str) -> bool:
    """Whether ``repo_id`` can be loaded without the network: a local folder, or a copy in the ``datasets`` cache
    (``ORG___NAME``) or the Hub cache (``datasets--ORG--NAME``)."""
    if Path(repo_id).expanduser().is_dir():
        return True
    datasets_cache, hub_cache = _cache_dirs()
    return ((datasets_cache / repo_id.replace("/", "___")).is_dir()
            or (hub_cache / f"datasets--{repo_id.replace('/', '--')}").is_dir())


def hub_status(repo_id: str) -> str:
    """"" when the Hub (or a local copy) can serve ``repo_id``, else why not. Asks the Hub only when it may be
    asked (HF_HUB_OFFLINE unset) and the dataset is in no local cache."""
    if hf_cached(repo_id):
        return ""
    if repo_id.startswith((".", "/", "~")):
        return "no such folder"
    if hub_offline():
        return "not in the local datasets cache, and HF_HUB_OFFLINE is set"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().dataset_info(repo_id, timeout=15)
    except RepositoryNotFoundError:
        return "no such dataset on the Hub"
    except Exception as err:  # noqa: BLE001 - any network failure means the same here
        return f"the Hub is unreachable ({type(err).__name__})"
    return ""


# ---- reading from the Hub ------------------------------------------------------------------------------------
def load_hf(repo_id: str, config: str | None, split: str, revision: str | None = None):
    """``datasets.load_dataset`` of one split (a Hub id or a local folder in the Hub's layout)."""
    import datasets

    try:
        return datasets.load_dataset(repo_id, config, split=split, revision=revision)
    except ValueError as err:  # unknown split or config: datasets names the accepted ones
        raise ConfigError(f"hf dataset {repo_id}: {err}") from None
    except (FileNotFoundError, ConnectionError) as err:
        raise ConfigError(f"hf dataset {repo_id}: cannot be loaded ({err}); HF_HUB_OFFLINE="
                          f"{os.environ.get('HF_HUB_OFFLINE', '')!r}") from None


def map_columns(dataset, columns: dict[str, str] | None, what: str):
    """The dataset with its columns renamed to ours (``columns``: ours -> theirs) and only our columns kept."""
    have = list(dataset.column_names)
    columns = dict(columns or {})
    unknown = {ours: theirs for ours, theirs in columns.items() if theirs not in have}
    if unknown:
        raise ConfigError(f"{what}: columns {unknown} name no column of the dataset; it has {have}")
    bad = sorted(set(columns) - set(ROW_COLUMNS))
    if bad:
        raise ConfigError(f"{what}: columns keys {bad} are not row fields; accepted: {', '.join(ROW_COLUMNS)}")
    keep = {theirs: ours for ours, theirs in columns.items()}
    for name in have:  # a dataset column already named as ours is kept unless mapped elsewhere
        if name in ROW_COLUMNS and name not in keep and name not in columns:
            keep[name] = name
    if not keep:
        raise ConfigError(f"{what}: no column maps to a row field; the dataset has {have}; map them with "
                          f"`columns: {{ours: theirs}}` (ours: {', '.join(ROW_COLUMNS)})")
    data = dataset.select_columns(list(keep))
    return data.rename_columns({t: o for t, o in keep.items() if t != o})


def _cache_root() -> Path:
    root = _cache_dirs()[0] / "ray_e5"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _key(entry: Any, split: str, fingerprint: str, extra: dict | None = None) -> str:
    from ray_e5.digest import digest

    return digest({"hf": entry.hf, "config": entry.config, "split": split, "columns": entry.columns,
                   "revision": getattr(entry, "revision", None), "data": fingerprint, **(extra or {})})[:16]


def hf_rows_file(entry: Any, what: str) -> str:
    """A training source read from the Hub: its rows (columns mapped) as a local Parquet file; returns its path."""
    split = hub_split(entry.split) or "train"
    dataset = map_columns(load_hf(entry.hf, entry.config, split, getattr(entry, "revision", None)),
                          entry.columns, what)
    out = _cache_root() / "rows" / f"{_key(entry, split, dataset._fingerprint)}.parquet"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        dataset.to_parquet(str(tmp))
        tmp.replace(out)
    return str(out)


def hf_task_folder(entry: Any, task_type: str, what: str) -> str:
    """An evaluation task read from the Hub: a local task folder (task.json + ``<split>.jsonl``, the layout
    :mod:`ray_e5.evaluate.local_tasks` reads); returns its path."""
    split = entry.split or "test"
    dataset = map_columns(load_hf(entry.hf, entry.config, split, getattr(entry, "revision", None)),
                          entry.columns, what)
    folder = _cache_root() / "tasks" / _key(entry, split, dataset._fingerprint, {"type": task_type})
    if not (folder / "task.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for row in dataset:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        info = {"type": task_type, "language": getattr(entry, "language", None) or "en",
                "source": f"hf:{entry.hf}" + (f" ({entry.config})" if entry.config else "")}
        (folder / "task.json").write_text(json.dumps(info))
    return str(folder)
