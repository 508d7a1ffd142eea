"""The evaluate stage on the session's real Ray cluster: fan-out over workers, per-task cache, failures kept apart,
Serve (HTTP) mode, the report, the CLI."""

from __future__ import annotations

import json
import os
import sys

import pytest

from ray_e5.cli import main
from ray_e5.config import ConfigError, load_config
from ray_e5.evaluate.run import evaluate
from ray_e5.testing.tasks import toy_tasks

TOYS = ["toy_retrieval", "toy_sts", "toy_bitext"]


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return toy_tasks(tmp_path_factory.mktemp("toys"), TOYS)


def _config(tmp_path, models, tasks, **evaluate_kwargs):
    data = {"run_dir": str(tmp_path / "run"),
            "evaluate": {"models": models, "tasks": tasks, "cpus_per_worker": 1, "torch_threads": 1,
                         **evaluate_kwargs}}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in data.items()])


@pytest.mark.slow  # the evaluate stage end to end, several times (about 55 s)
def test_fan_out_cache_failures_and_report(ray_cluster, tiny_decoder_dir, toys, tmp_path):
    models = [{"label": "tiny", "model": str(tiny_decoder_dir)},
              {"label": "tiny-plain", "model": str(tiny_decoder_dir), "instructions": False},
              {"label": "broken", "model": str(tmp_path / "no-such-model")}]
    tasks = [str(toys[name]) for name in TOYS] + ["STS12"]  # STS12 needs the hub, which is offline here
    config = _config(tmp_path, models, tasks, num_workers=2)
    report = evaluate(config).report

    out = tmp_path / "run" / "eval"
    scores = report["scores"]
    # instructions off: each toy item's partner is the identical text, so mteb's metrics are perfect
    assert scores["tiny-plain"]["toy_retrieval"] == pytest.approx(100.0)
    assert scores["tiny-plain"]["toy_bitext"] == pytest.approx(100.0)
    assert all(scores["tiny"][name] is not None for name in TOYS)
    # failures are recorded per task and per model; the other tasks are not lost
    failed = {(e["model"], e["task"]) for e in report["errors"]}
    assert failed == {("tiny", "STS12"), ("tiny-plain", "STS12")} | {("broken", t) for t in TOYS + ["STS12"]}
    broken = next(e for e in report["errors"] if e["model"] == "broken")
    assert "could not be loaded" in broken["error"] and "no-such-model" in broken["error"]
    assert "STS12" in next(e["error"] for e in report["errors"] if e["task"] == "STS12" and e["model"] == "tiny")
    # one Ray task per MTEB task, spread over both workers of a model
    records = {name: json.loads((out / "results" / "tiny" / f"{name}.json").read_text()) for name in TOYS}
    assert len({r["pid"] for r in records.values()}) == 2 and os.getpid() not in {r["pid"] for r in records.values()}
    assert records["toy_retrieval"]["instructions"] == {"query": "Given a sentence, retrieve the same sentence",
                                                        "document": None}
    assert records["toy_sts"]["result"]["task_name"] == "toy_sts"  # mteb's full TaskResult is kept
    assert not (out / "results" / "tiny" / "STS12.json").exists()  # failures are not cached as finished
    # the report
    md = (out / "report.md").read_text()
    assert "| Model | Average | " in md  # (an English average beside it: toy_bitext is not English)
    assert "| Classification | Clustering | PairClassification | Reranking | Retrieval | STS" in md
    assert "| tiny-plain |" in md and "## Failed" in md and "could not be loaded" in md
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "report.json").read_text())
    assert saved["scores"] == scores and saved["categories"]["tiny-plain"]["Retrieval"] == pytest.approx(100.0)

    # a rerun skips what is finished and retries only what failed
    again = evaluate(_config(tmp_path, models[:2], [str(toys[name]) for name in TOYS], num_workers=2)).report
    assert again["ran"] == [] and len(again["cached"]) == 6 and again["scores"] == {k: {t: scores[k][t] for t in TOYS}
                                                                                  for k in ("tiny", "tiny-plain")}
    # changing a task's instruction reruns that task only
    changed = evaluate(_config(tmp_path, models[:1], [str(toys[name]) for name in TOYS],
                               instructions={"toy_sts": "Retrieve sentences with the same meaning"})).report
    assert changed["ran"] == ["tiny/toy_sts"] and sorted(changed["cached"]) == ["tiny/toy_bitext", "tiny/toy_retrieval"]
    assert changed["instructions"]["toy_sts"] == {"all": "Retrieve sentences with the same meaning"}


class CrashingTask:
    """A task whose worker process dies (as on an out-of-memory kill) when it is run."""

    name, type, fingerprint = "crash", "STS", "crash"

    def build(self):
        os._exit(1)


def test_a_dying_worker_loses_only_its_task(ray_cluster, tiny_decoder_dir, toys):
    import cloudpickle

    from ray_e5.evaluate.config import EvaluateSettings
    from ray_e5.evaluate.models import ModelSpec
    from ray_e5.evaluate.config import TaskEntry
    from ray_e5.evaluate.run import _run_all
    from ray_e5.evaluate.tasks import resolve_task

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    good = resolve_task(TaskEntry(path=str(toys["toy_sts"])))
    records = {}
    settings = EvaluateSettings(num_workers=1, cpus_per_worker=1, torch_threads=1, max_restarts=1)
    spec = ModelSpec("tiny", str(tiny_decoder_dir))
    _run_all(ray_cluster, [(spec, CrashingTask()), (spec, good)], settings, {},
             lambda model, task, record: records.__setitem__(task.name, record))
    assert records["crash"]["status"] == "error" and "worker died" in records["crash"]["error"]
    assert records["toy_sts"]["status"] == "ok"


@pytest.mark.slow  # the evaluate stage end to end against a Serve deployment (about 45 s)
def test_serve_mode_matches_in_process(ray_cluster, tiny_decoder_dir, toys, tmp_path):
    """Vectors from the ray-e5 Serve deployment over HTTP give the scores of the same model in-process, with the
    instruction applied by the server (its `instruction` parameter) or by the client (plain OpenAI text)."""
    import socket

    from ray import serve

    from ray_e5.evaluate.run import score_local_task
    from ray_e5.model import Embedder
    from ray_e5.serve.app import build_app, start_serve
    from ray_e5.serve.config import ServeSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(model_name="tiny", host="127.0.0.1", port=port, num_cpus=0.5, api_key_env=None)
    start_serve(settings)
    try:
        serve.run(build_app(settings, str(tiny_decoder_dir)),
                  name="eval-tiny", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        models = [{"label": "served", "model": "tiny", "endpoint": url},
                  {"label": "served-client", "model": "tiny", "endpoint": url + "/v1", "instruction_mode": "client"}]
        report = evaluate(_config(tmp_path, models, [str(toys["toy_retrieval"]), str(toys["toy_sts"])],
                                  num_workers=2)).report
    finally:
        serve.shutdown()
    assert report["errors"] == []
    embedder = Embedder.load(str(tiny_decoder_dir))
    for name in ("toy_retrieval", "toy_sts"):  # instructions on in every path
        expected = 100 * score_local_task(embedder, toys[name])
        assert report["scores"]["served"][name] == pytest.approx(expected, abs=1e-3)
        assert report["scores"]["served-client"][name] == pytest.approx(expected, abs=1e-3)


def test_cli_and_bad_config(ray_cluster, tiny_decoder_dir, toys, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "evaluate": {
        "models": [{"label": "tiny", "model": str(tiny_decoder_dir), "instructions": False}],
        "tasks": [str(toys["toy_bitext"])], "cpus_per_worker": 1}}))
    assert main(["evaluate", "--config", str(cfg), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["scores"]["tiny"]["toy_bitext"] == pytest.approx(100.0)
    assert (tmp_path / "run" / "eval" / "report.md").is_file()

    assert main(["evaluate", "--config", str(cfg), "--set", "evaluate.num_wrkers=2"]) == 2
    assert "evaluate.num_wrkers: unknown key" in capsys.readouterr().err
    assert main(["evaluate", "--config", str(cfg), "--set", f"evaluate.tasks=[{tmp_path}/missing]"]) == 2
    assert "task 'missing'" in capsys.readouterr().err
    assert main(["evaluate", "--config", str(cfg), "--set", "evaluate.tasks=[NotAnMtebTask]"]) == 2
    assert "task 'NotAnMtebTask': not an MTEB task name" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="evaluate.tasks is empty"):
        evaluate(load_config(cfg, ["evaluate.tasks=[]"]))


@pytest.mark.slow  # the evaluate stage end to end, twice (about 20 s)
def test_a_dominant_corpus_is_embedded_in_shards_by_every_worker(ray_cluster, tiny_decoder_dir, toys, tmp_path):
    models = [{"label": "tiny", "model": str(tiny_decoder_dir)}]
    tasks = [str(toys["toy_retrieval"])]  # one task: without shards, one of the two workers would idle
    whole = evaluate(_config(tmp_path / "whole", models, tasks, num_workers=2, shard_min_chars=0)).report
    sharded = evaluate(_config(tmp_path / "sharded", models, tasks, num_workers=2, shard_min_chars=1)).report
    record = json.loads((tmp_path / "sharded" / "run" / "eval" / "results" / "tiny" / "toy_retrieval.json").read_text())
    assert record["status"] == "ok" and record["corpus_shards"] == 2
    from ray_e5.evaluate.local_tasks import load_local_task
    from ray_e5.evaluate.sharding import corpus_texts

    documents = corpus_texts(load_local_task(toys["toy_retrieval"]))
    assert len(documents) > 1 and record["precomputed_documents"] == len(documents)  # none embedded again
    unsharded = json.loads((tmp_path / "whole" / "run" / "eval" / "results" / "tiny" / "toy_retrieval.json").read_text())
    assert "corpus_shards" not in unsharded
    # the same score: only where the document vectors were computed moved
    assert sharded["scores"]["tiny"]["toy_retrieval"] == pytest.approx(whole["scores"]["tiny"]["toy_retrieval"], abs=1e-6)


def test_shards_balance_characters_and_keep_every_text():
    from ray_e5.evaluate.sharding import shards, worth_sharding

    texts = ["a" * n for n in (90, 50, 40, 30, 20, 10)] + ["a" * 10]  # one duplicate
    parts = shards(texts, 2)
    assert sorted(t for p in parts for t in p) == sorted(set(texts))
    loads = [sum(len(t) for t in p) for p in parts]
    assert max(loads) - min(loads) <= 10
    assert worth_sharding(task_chars=800, all_chars=1000, workers=2, min_chars=100)
    assert not worth_sharding(task_chars=400, all_chars=1000, workers=2, min_chars=100)  # whole tasks balance
    assert not worth_sharding(task_chars=800, all_chars=1000, workers=1, min_chars=100)
