"""Data by reference against a real S3-compatible server (moto's standalone server on loopback): inputs named
under an s3:// data_dir, bad object stores stopping a stage before any work with the URI named, the eval cache
keyed by a remote listing, ``ray-e5 export s3://...``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import ray_e5.testing.cluster as cs


@pytest.fixture
def aws(moto, monkeypatch):
    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    return moto


def _put(moto, key: str, text: str) -> None:
    with moto.filesystem().open_output_stream(key) as out:
        out.write(text.encode())


def _triplets(n: int) -> str:
    return "".join(json.dumps({"query": f"query {i} about topic {i % 7}", "positive": f"passage {i} answers it",
                               "negative": f"unrelated text {i}"}) + "\n" for i in range(n))


def _config(**top):
    from ray_e5.config import check_config

    return check_config({"run_dir": "s3://runs/r1", "data_dir": "s3://data/labeled", **top})


def test_sources_under_an_s3_data_dir_plan_through_remote_tasks(aws, ray_cluster):
    from ray_e5.data.batching import build_plan
    from ray_e5.train.config import TrainSettings
    from ray_e5.train.run import _sources

    _put(aws, "data/labeled/nli/train.jsonl", _triplets(40))
    config = _config(train={"sources": [{"path": "nli"}], "synthetic": False})
    sources = _sources(config, config.section("train", TrainSettings))
    assert [s.name for s in sources] == ["nli"] and sources[0].files == ("data/labeled/nli/train.jsonl",)
    plan = build_plan(sources, batch_size=8, min_batch=8)
    assert plan.sources["nli"]["valid"] == 40 and plan.steps == 5
    assert plan.dataset.count() == 5


def test_missing_dataset_bucket_and_store_are_named_before_any_work(aws, monkeypatch):
    from ray_e5.config import ConfigError
    from ray_e5.train.config import TrainSettings
    from ray_e5.train.run import _sources

    config = _config(train={"sources": [{"path": "no_such_set/train.jsonl"}], "synthetic": False})
    with pytest.raises(ConfigError, match=r"train.sources.0.path: 's3://data/labeled/no_such_set/train.jsonl': no "
                                          r"such file or folder \(data_dir 's3://data/labeled'\)"):
        _sources(config, config.section("train", TrainSettings))
    missing_bucket = _config(run_dir="s3://no-such-bucket/run", train={"sources": [{"path": "x"}]})
    with pytest.raises(ConfigError, match=r"run_dir: 's3://no-such-bucket/run': bucket 'no-such-bucket' does not "
                                          r"exist at http://127.0.0.1:\d+"):
        _sources(missing_bucket, missing_bucket.section("train", TrainSettings))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{cs.free_port()}")  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"run_dir: 's3://runs/r1': the object store at http://127.0.0.1:\d+ "
                                          r"cannot be reached"):
        _sources(config, config.section("train", TrainSettings))
    print(f"unreachable store reported after {time.perf_counter() - started:.1f} s (the AWS SDK's retries)")


def test_refused_credentials_are_named(tmp_path, monkeypatch):
    from ray_e5 import storage

    server = cs.start_moto(tmp_path, auth=True)  # refuses every key it did not issue
    try:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(storage.StorageError, match=r"data: 's3://data/x': the object store at http://127.0.0.1:\d+ "
                                                    r"refused the credentials"):
            storage.check_access("s3://data/x", "data")
    finally:
        server.stop()


def test_eval_tasks_and_contamination_sets_from_s3(aws):
    from ray_e5.evaluate.config import EvaluateSettings
    from ray_e5.evaluate.tasks import resolve_tasks
    from ray_e5.testing.tasks import toy_tasks
    from ray_e5.generate.config import GenerateSettings
    from ray_e5.generate.filters import ContaminationFilter

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        toys = toy_tasks(Path(tmp), ["toy_sts"])
        rows = [json.loads(line) for line in (Path(toys["toy_sts"]) / "test.jsonl").read_text().splitlines()]
        for f in sorted(Path(toys["toy_sts"]).rglob("*")):
            if f.is_file():
                cs.upload(aws, f, f"data/labeled/toy_sts/{f.relative_to(toys['toy_sts'])}")
    config = _config(evaluate={"tasks": [{"path": "toy_sts"}]})
    settings = config.section("evaluate", EvaluateSettings)
    (spec,) = resolve_tasks(settings.task_entries(config.data_dir), data_dir=config.data_dir)
    assert spec.name == "toy_sts" and spec.local and spec.text_chars() > 0
    _put(aws, "data/labeled/toy_sts/extra.txt", "rewritten")  # the folder changes: its fingerprint does
    (again,) = resolve_tasks(settings.task_entries(config.data_dir), data_dir=config.data_dir)
    assert again.fingerprint != spec.fingerprint
    # contamination sets default to the evaluation tasks of the same config, read from the store
    generate = GenerateSettings()
    filt = ContaminationFilter.from_config(config, generate)
    assert filt.files > 0 and (filt.grams or filt.short)
    sentence = max((r["sentence1"] for r in rows), key=lambda t: len(t.split()))  # an evaluated sentence is caught
    assert len(sentence.split()) >= 3
    assert filt.check({"query": sentence, "positive": "x", "negative": ""}) == "contaminated"
    assert filt.check({"query": "an unrelated question about rockets", "positive": "x", "negative": ""}) is None
    with pytest.raises(Exception, match=r"s3://data/labeled/nowhere"):
        ContaminationFilter.from_config(config, GenerateSettings(contamination_paths=["nowhere"]))


def test_remote_embedder_is_evaluated_cached_by_listing_and_exported(aws, tiny_decoder_dir, tmp_path):
    from ray_e5.cli import main
    from ray_e5.evaluate.config import EvaluateSettings
    from ray_e5.evaluate.models import resolve_models
    from ray_e5.model import Embedder

    embedder = Embedder.load(str(tiny_decoder_dir))
    embedder.save(tmp_path / "emb")
    for f in sorted((tmp_path / "emb").rglob("*")):
        if f.is_file():
            cs.upload(aws, f, f"runs/r1/embedder/{f.relative_to(tmp_path / 'emb')}")
    config = _config()
    (spec,) = resolve_models(config, config.section("evaluate", EvaluateSettings))  # no evaluate.models
    assert spec.label == "trained" and spec.ref == "s3://runs/r1/embedder"
    before = spec.fingerprint
    _put(aws, "runs/r1/embedder/ray_e5.json", (tmp_path / "emb" / "ray_e5.json").read_text() + " ")  # retrained
    assert resolve_models(config, config.section("evaluate", EvaluateSettings))[0].fingerprint != before
    assert main(["export", "s3://runs/r1/embedder", "-o", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "modules.json").is_file() and any((tmp_path / "merged").glob("*.safetensors"))
    assert main(["export", "s3://runs/r1/nothing", "-o", str(tmp_path / "m2")]) == 2
