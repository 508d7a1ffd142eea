"""Datasets named as users name them: a Hugging Face dataset (read with `datasets.load_dataset`, columns mapped to
our rows), an mteb task, or a path under data_dir (a local mirror read first). A machine with neither the mirror nor
the Hub stops before any work, naming each missing dataset. No test here touches the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_e5.config import ConfigError, load_config
from ray_e5.datasets import check_datasets, lookups
from ray_e5.data.sources import read_rows, source_from_settings
from ray_e5.train.config import SourceSettings

EXE = Path(sys.executable).with_name("ray-e5")


@pytest.fixture
def hub_repo(tmp_path, monkeypatch):
    """A dataset repository folder in the Hub's layout (Parquet shards under data/, configs in README.md's front
    matter), as `huggingface-cli download` leaves it; our rows' cache goes to tmp_path."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "org--triplets"
    (repo / "data").mkdir(parents=True)
    train = {"anchor": [f"what is item {i}" for i in range(12)], "pos": [f"item {i} is a thing" for i in range(12)],
             "neg": [f"item {i + 1} is another" for i in range(12)], "noise": list(range(12))}
    pq.write_table(pa.table(train), repo / "data" / "train-00000-of-00001.parquet")
    test = {"s1": [f"a cat {i}" for i in range(8)], "s2": [f"a feline {i}" for i in range(8)],
            "sim": [float(i % 6) for i in range(8)]}
    pq.write_table(pa.table(test), repo / "data" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: triplets\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "- config_name: sts\n  data_files:\n  - split: test\n    path: data/test-*\n---\n# a tiny dataset\n")
    return repo


def test_a_hub_dataset_is_read_through_datasets_with_its_columns_mapped(hub_repo):
    entry = SourceSettings(hf=str(hub_repo), config="triplets", split="train",
                           columns={"query": "anchor", "positive": "pos", "negative": "neg"})
    source = source_from_settings(entry, data_dir=None)
    rows = read_rows(source).to_pylist()
    assert source.name == "org--triplets-triplets" and len(rows) == 12
    assert [r["problem"] for r in rows] == [""] * 12
    assert rows[3]["query"] == "what is item 3" and rows[3]["negative"] == "item 4 is another"
    again = source_from_settings(entry, data_dir=None)  # a rerun names the same file: training can resume
    assert again.files == source.files

    bad = SourceSettings(hf=str(hub_repo), config="triplets", columns={"query": "question", "positive": "pos"})
    with pytest.raises(Exception, match=r"name no column of the dataset; it has \['anchor', 'pos', 'neg', 'noise'\]"):
        source_from_settings(bad, data_dir=None)
    with pytest.raises(Exception, match="split"):
        source_from_settings(SourceSettings(hf=str(hub_repo), config="triplets", split="validation",
                                            columns={"query": "anchor", "positive": "pos"}), data_dir=None)


def test_a_hub_dataset_as_an_evaluation_task(hub_repo):
    from ray_e5.evaluate.config import TaskEntry
    from ray_e5.evaluate.tasks import resolve_task

    entry = TaskEntry(hf=str(hub_repo), config="sts", type="sts", columns={"sentence1": "s1", "sentence2": "s2", "score": "sim"},
                      name="tiny-sts")
    spec = resolve_task(entry)
    assert (spec.name, spec.type, spec.local) == ("tiny-sts", "STS", True)
    data = spec.task.dataset["default"]["test"]
    assert data.num_rows == 8 and data["sentence2"][2] == "a feline 2" and data["score"][5] == 5.0
    with pytest.raises(ValueError, match="an `hf` task needs `type`"):
        TaskEntry(hf=str(hub_repo))


def test_the_mirror_serves_an_entry_that_names_both(shared_data, hub_repo):
    """hf + path: the path under data_dir when present (no Hub asked); the Hub's copy when the mirror lacks it."""
    both = SourceSettings(path="stsbenchmark/train.jsonl", hf="mteb/stsbenchmark-sts", name="stsb", min_score=4.0)
    source = source_from_settings(both, str(shared_data))
    assert source.files == (str(shared_data / "stsbenchmark" / "train.jsonl"),)
    rows = read_rows(source).to_pylist()
    assert sum(not r["problem"] for r in rows) > 100 and len(rows) == 5749

    elsewhere = SourceSettings(path="no_such_folder/train.jsonl", hf=str(hub_repo), config="triplets",
                               columns={"query": "anchor", "positive": "pos"})
    fallback = source_from_settings(elsewhere, str(shared_data))
    assert fallback.name == "no_such_folder" and read_rows(fallback).num_rows == 12

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml",
                         [f"data_dir={shared_data}"])
    found = check_datasets(config)
    assert len(found) == 4 and {f.found for f in found} == {"mirror"}, found

    # an evaluation task that names both is read from the mirror's folder too, with the Hub offline
    from ray_e5.evaluate.tasks import resolve_tasks

    tasks = resolve_tasks(config.evaluate.task_entries(config.data_dir), data_dir=config.data_dir)
    assert len(tasks) == 2 and all(t.entry.hf is None and t.entry.path for t in tasks), tasks
    assert {t.name for t in tasks} == {"stsbenchmark", "scifact"}, [t.name for t in tasks]


def test_without_mirror_or_hub_the_quickstart_stops_before_any_work(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "RAY_TMPDIR": str(tmp_path / "ray")}
    env.pop("HF_DATASETS_CACHE", None)
    env.pop("RAY_ADDRESS", None)
    run = tmp_path / "run"
    done = subprocess.run([str(EXE), "quickstart", "--smoke", "--data-dir", "/nonexistent", "--run-dir", str(run)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    err = done.stderr
    assert done.returncode == 2, err[-3000:]
    for named in ("train.sources.0 (snli_triplets/train.jsonl)", "/nonexistent/snli_triplets/train.jsonl",
                  "sentence-transformers/all-nli", "train.sources.1 (stsb)", "/nonexistent/stsbenchmark/train.jsonl",
                  "evaluate.tasks.0 (stsbenchmark)", "mteb/stsbenchmark-sts", "HF_HUB_OFFLINE is set", "--data-dir"):
        assert named in err, f"{named!r} not in:\n{err}"
    assert "Traceback" not in err
    assert not run.exists()  # generation never started: no synthetic/ (nor any run directory)
    assert not (tmp_path / "ray").exists()  # and no Ray session was started


def test_entries_need_a_path_or_a_dataset():
    with pytest.raises(ValueError, match="a source needs `path`"):
        SourceSettings()
    config = load_config(None, ["evaluate.tasks=[{path: nowhere}]", "train.sources=[{path: nowhere.jsonl}]",
                                "data_dir=/nonexistent"])
    with pytest.raises(ConfigError) as info:
        check_datasets(config)
    assert "no Hub dataset named (add `hf:` or `mteb:` to the entry)" in str(info.value)
    assert [f.key for f in lookups(config, ask_hub=False)] == ["train.sources.0", "evaluate.tasks.0"]
