"""Resolving the configured tasks: task folders (named relative to the config's ``data_dir``, local or at an
``s3://`` / ``gs://`` URI) become loaded mteb tasks on the driver (so bad folders fail before any model is loaded,
and workers on other machines get the data through the object store, never from a disk of their own); MTEB names
are checked against mteb's registry here and loaded by the worker that runs them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_e5.digest import digest
from ray_e5.settings import ConfigError
from ray_e5.evaluate.config import TaskEntry
from ray_e5.evaluate.local_tasks import load_local_task


@dataclass
class TaskSpec:
    """One configured task: its reported name, its type, and how to build it."""

    name: str
    type: str  # mteb task type (STS, Retrieval, ...)
    entry: TaskEntry
    local: bool
    fingerprint: str
    task: Any = field(default=None, repr=False)  # the loaded local task, a benchmark's (unloaded) task, or None

    def build(self):
        """The mteb task object (hub tasks are created here, in the process that will run them)."""
        if self.task is not None:
            return self.task
        return hub_task(self.entry)

    def text_chars(self) -> int:
        """Characters of text a model must embed for this task: a loaded local task's, or 0 when unknown (a hub
        task is loaded only by its worker)."""
        if not self.local or self.task is None:
            return 0
        if hasattr(self.task, "text_chars"):
            return self.task.text_chars()
        return _text_chars(getattr(self.task, "dataset", None))


def _text_chars(data: Any) -> int:
    if isinstance(data, str):
        return len(data)
    if isinstance(data, dict):
        return sum(_text_chars(v) for v in data.values())
    if isinstance(data, (list, tuple)):
        return sum(_text_chars(v) for v in data)
    if hasattr(data, "column_names"):  # a datasets.Dataset; ids are not embedded
        return sum(_text_chars(list(data[c])) for c in data.column_names if c != "id")
    return 0


def md_type(task) -> str:
    return getattr(getattr(task, "metadata", None), "type", "")


def largest_first(tasks: list[TaskSpec]) -> list[TaskSpec]:
    """Tasks in decreasing order of the text they embed (ties and unknown sizes keep their order): with several
    workers, the longest task starts first instead of last, so it does not run alone at the end (LPT scheduling)."""
    return sorted(tasks, key=lambda t: -t.text_chars())


def hub_task(entry: TaskEntry):
    import mteb

    name = entry.mteb or entry.name
    try:
        return mteb.get_task(name, eval_splits=[entry.split] if entry.split else None)
    except KeyError as err:
        raise ConfigError(f"task {name!r}: not an MTEB task name ({err}); give a local folder as `path`, "
                          "or a name from mteb.get_tasks()") from None


def task_uri(entry: TaskEntry, data_dir: str | None = None) -> str:
    """Where a task folder lives: ``entry.path`` under ``data_dir`` (a URI or absolute path as it is)."""
    from ray_e5 import storage

    return storage.data_uri(data_dir, entry.path) if data_dir is not None else storage.absolute(entry.path)


def passkey_task(entry: TaskEntry, seed: int = 42) -> TaskSpec:
    from ray_e5.evaluate.passkey import DEFAULT_LENGTHS, DEFAULT_SAMPLES, PasskeyTask

    task = PasskeyTask(name=entry.name or "Passkey", lengths=sorted(set(entry.lengths or DEFAULT_LENGTHS)),
                       samples=entry.max_samples or DEFAULT_SAMPLES, depth=entry.depth, seed=seed,
                       instruction=entry.instruction)
    key = {"type": "passkey", "lengths": task.lengths, "samples": task.samples, "depth": task.depth, "seed": seed,
           "version": 1}
    return TaskSpec(task.name, "Passkey", entry, True, _digest(key), task)


def resolve_task(entry: TaskEntry, seed: int = 42, data_dir: str | None = None) -> TaskSpec:
    if entry.type == "passkey":
        return passkey_task(entry, seed)
    if entry.path and (entry.hf or entry.mteb):
        if _present(task_uri(entry, data_dir)):  # the mirror serves it: read the folder, never the Hub
            entry = entry.model_copy(update={"hf": None, "mteb": None, "config": None, "columns": None,
                                             "revision": None})
        else:  # the mirror lacks it: the Hub serves the entry (the mirror's `dev` split is the Hub's `validation`)
            from ray_e5.data.hub import hub_split

            entry = entry.model_copy(update={"path": None, "split": hub_split(entry.split)})
    if entry.hf:
        return hf_task(entry, seed)
    if entry.path:
        from ray_e5 import storage

        uri = task_uri(entry, data_dir)
        name = entry.name or uri.rstrip("/").rsplit("/", 1)[-1]
        where = f" (data_dir {data_dir!r})" if data_dir is not None and storage.is_relative(entry.path) else ""
        folder, files = uri, None
        if not storage.is_local(uri):
            try:
                storage.check_access(uri, f"task {name!r}")
            except storage.StorageError as err:
                raise ConfigError(f"{err}{where}") from None
            files = storage.listing(uri)
            if files is None:
                raise ConfigError(f"task {name!r}: {uri!r} is not a folder{where}")
            folder = storage.local_copy(uri)  # keyed by the listing: a rewritten folder is fetched again
        elif where and not Path(uri).is_dir():
            raise ConfigError(f"task {name!r} ({uri}): folder does not exist{where}")
        task = load_local_task(folder, name=name, split=entry.split or "test", subsets=entry.subsets,
                               max_samples=entry.max_samples, max_corpus=entry.max_corpus, seed=seed,
                               main_score=entry.main_score)
        if entry.n_experiments is not None:
            if md_type(task) != "Classification":
                raise ConfigError(f"task {name!r}: n_experiments applies to classification tasks only")
            task.n_experiments = entry.n_experiments
        md = task.metadata
        key = {"path": uri if files is not None else str(Path(uri).resolve()),
               "data": md.dataset["revision"] if files is None else _digest(files), "split": md.eval_splits,
               "subsets": entry.subsets, "max_samples": entry.max_samples, "max_corpus": entry.max_corpus,
               "seed": seed, "main_score": md.main_score,
               **({"n_experiments": entry.n_experiments} if entry.n_experiments is not None else {})}
        return TaskSpec(md.name, md.type, entry, True, _digest(key), task)
    task = hub_task(entry)
    md = task.metadata
    key = {"name": md.name, "revision": md.dataset.get("revision"), "splits": list(task.eval_splits)}
    return TaskSpec(md.name, md.type, entry, False, _digest(key))


def _present(uri: str) -> bool:
    from ray_e5 import storage

    try:
        return storage.exists(uri)
    except Exception:  # noqa: BLE001 - an unreachable mirror is an absent one: the Hub serves the entry
        return False


def hf_task(entry: TaskEntry, seed: int = 42) -> TaskSpec:
    """A task read from a Hugging Face dataset: its rows become a local task folder of ``entry.type``
    (:func:`ray_e5.data.hub.hf_task_folder`), scored as the local folders are."""
    from ray_e5.data.hub import hf_task_folder

    name = entry.name or entry.hf.rstrip("/").rsplit("/", 1)[-1] + (f"-{entry.config}" if entry.config else "")
    folder = hf_task_folder(entry, entry.type, f"task {name!r} (hf dataset {entry.hf})")
    local = entry.model_copy(update={"path": folder, "hf": None, "type": None, "columns": None, "config": None,
                                     "revision": None, "name": name})
    return resolve_task(local, seed, None)


def benchmark_tasks(name: str) -> list[TaskSpec]:
    """The tasks of an mteb benchmark, as the benchmark filters them (languages, subsets, splits)."""
    import mteb

    try:
        benchmark = mteb.get_benchmark(name)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"evaluate.benchmark: {name!r} is not an mteb benchmark ({err})") from None
    specs = []
    for task in benchmark.tasks:
        md = task.metadata
        key = {"name": md.name, "revision": md.dataset.get("revision"), "splits": list(task.eval_splits),
               "subsets": list(task.hf_subsets)}
        specs.append(TaskSpec(md.name, md.type, TaskEntry(name=md.name), False, _digest(key), task))
    return specs


def resolve_tasks(entries: list[TaskEntry], seed: int = 42, benchmark: str | None = None,
                  data_dir: str | None = None) -> list[TaskSpec]:
    specs = [resolve_task(e, seed, data_dir) for e in entries]
    if benchmark:
        named = {s.name for s in specs}
        specs += [s for s in benchmark_tasks(benchmark) if s.name not in named]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"two tasks are named {spec.name!r}; give one of them a distinct `name`")
        seen[spec.name] = spec.type
    if not specs:
        raise ConfigError("evaluate.tasks is empty: list local folders (e.g. ../shared/data/stsbenchmark) "
                          "or MTEB task names, or set evaluate.benchmark")
    return specs


_digest = digest
