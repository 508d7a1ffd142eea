"""Every dataset a config names, found before any work starts.

The ``train`` and ``evaluate`` sections name datasets as users name them: a Hugging Face dataset (``hf:``), an
mteb task (``mteb:``), or a path under ``data_dir`` (a local mirror that serves the same entries offline). An entry
with both a path and a Hub name is read from ``data_dir/path`` when that is present, else from the Hub.
:func:`check_datasets` finds every entry that neither place can serve, so a machine without the mirror and without
the Hub stops at once with one message naming each missing dataset, rather than after generation has run.

It reads the stages' settings and asks :mod:`ray_e5.evaluate.tasks` about mteb names, so it sits above them; the
readers below (:mod:`ray_e5.data.hub`, :mod:`ray_e5.data.sources`) import none of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray_e5 import storage
from ray_e5.config import RayE5Config
from ray_e5.data.hub import hub_split, hub_status
from ray_e5.settings import ConfigError


class MissingDatasetsError(ConfigError):
    """Datasets that neither the mirror under ``data_dir`` nor the Hub can serve; one line per dataset."""

    def __str__(self) -> str:
        return (f"{len(self.errors) - 1} datasets are neither under data_dir nor on the Hub:\n"
                + "\n".join(f"  {line}" for line in self.errors))


@dataclass(frozen=True)
class Lookup:
    """Where one configured dataset was looked for and what was found."""

    key: str  # "train.sources.0", "evaluate.tasks.2"
    label: str  # what the user calls it: the name, path or Hub id
    mirror: str | None  # the mirror location (data_dir/path), when the entry has a path
    hub: str | None  # "hf dataset ORG/NAME (config C, split S)" or "mteb task NAME", when the entry names one
    found: str | None  # "mirror", "hub", or None
    why: str = ""  # why the Hub could not serve it


def mteb_dataset(name: str) -> str:
    """The Hub dataset behind an mteb task name (ConfigError for a name mteb does not know)."""
    from ray_e5.evaluate.tasks import hub_task
    from ray_e5.evaluate.config import TaskEntry

    return hub_task(TaskEntry(name=name)).metadata.dataset["path"]


def _mirror_present(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except Exception:  # noqa: BLE001 - an unreachable store is an absent mirror here
        return False


def _describe_hf(entry: Any, default_split: str) -> str:
    parts = [f"config {entry.config}"] if entry.config else []
    parts.append(f"split {hub_split(entry.split) or default_split}")
    return f"hf dataset {entry.hf} ({', '.join(parts)})"


def locate(key: str, entry: Any, data_dir: str | None, default_split: str, ask_hub: bool = True) -> Lookup:
    """Where ``entry`` (a train source or an evaluation task entry) will be read from (``ask_hub=False``: the
    mirror only; an entry it lacks is reported not found, the Hub unasked)."""
    path, hf, mteb = getattr(entry, "path", None), getattr(entry, "hf", None), getattr(entry, "mteb", None)
    if mteb is None and not path and not hf and getattr(entry, "name", None) and getattr(entry, "type", None) is None:
        mteb = entry.name  # an evaluation task named by its mteb name only
    label = getattr(entry, "name", None) or path or hf or mteb or key
    mirror = None
    if path:
        mirror = storage.data_uri(data_dir, path) if data_dir is not None else storage.absolute(path)
        if _mirror_present(mirror):
            return Lookup(key, label, mirror, None, "mirror")
    if not ask_hub:
        return Lookup(key, label, mirror, None, None, "the Hub was not asked")
    if hf:
        why = hub_status(hf)
        return Lookup(key, label, mirror, _describe_hf(entry, default_split), None if why else "hub", why)
    if mteb:
        try:
            why = hub_status(mteb_dataset(mteb))
        except ConfigError as err:
            why = str(err)
        return Lookup(key, label, mirror, f"mteb task {mteb}", None if why else "hub", why)
    return Lookup(key, label, mirror, None, None)


def lookups(config: RayE5Config, ask_hub: bool = True) -> list[Lookup]:
    """Every dataset the config's train and evaluate sections name, and where each is found."""
    found = []
    if config.has_section("train"):
        train = config.train
        found += [locate(f"train.sources.{i}", s, config.data_dir, "train", ask_hub) for i, s in enumerate(train.sources)]
        if train.eval_every is not None:  # the dev sets of evaluation during training
            found += [locate(f"train.eval_tasks.{i}", t, config.data_dir, "test", ask_hub)
                      for i, t in enumerate(train.eval_tasks)]
    if config.has_section("evaluate"):
        for i, task in enumerate(config.evaluate.task_entries(config.data_dir)):
            if task.type != "passkey":
                found.append(locate(f"evaluate.tasks.{i}", task, config.data_dir, "test", ask_hub))
    return found


def missing_message(missing: list[Lookup], data_dir: str) -> list[str]:
    lines = []
    for m in missing:
        where = []
        if m.mirror:
            where.append(f"not at {m.mirror} (under data_dir {data_dir})")
        if m.hub:
            where.append(f"{m.hub}: {m.why}")
        elif not m.mirror:
            where.append("names neither a path nor a Hub dataset")
        else:
            where.append("no Hub dataset named (add `hf:` or `mteb:` to the entry)")
        lines.append(f"{m.key} ({m.label}): " + "; ".join(where))
    lines.append(f"nothing was started. Pass --data-dir DIR (data_dir) to point at a mirror holding these paths, "
                 f"or let the Hub serve them (unset HF_HUB_OFFLINE on a machine that reaches huggingface.co)")
    return lines


def check_datasets(config: RayE5Config, stages: tuple[str, ...] | None = None) -> list[Lookup]:
    """Every dataset of the ``train`` and ``evaluate`` sections (of those in ``stages``) found on the mirror or the
    Hub; else one :class:`MissingDatasetsError` naming each missing one and where it was looked for."""
    found = [f for f in lookups(config) if stages is None or f.key.split(".")[0] in stages]
    missing = [f for f in found if f.found is None]
    if missing:
        raise MissingDatasetsError(missing_message(missing, config.data_dir))
    return found
