"""Experiment tracking (train.report_to) and evaluation during training (train.eval_every, train.keep_best): a real
Ray Train run on the tiny decoder, its MLflow and TensorBoard logs read back with their own readers, and the
published embedder checked against the best checkpoint's."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from ray_e5.config import ConfigError, RayE5Config
from ray_e5.testing.tasks import toy_retrieval, write_jsonl, write_task_json


def _labeled(path, n=48):
    rows = [{"query": f"question {i} about topic {i % 7}", "positive": f"answer {i} on topic {i % 7}",
             "negative": f"unrelated text {i}"} for i in range(n)]
    write_jsonl(path, rows)
    return str(path)


def _dev_sts(folder):
    """A dev STS set on the training data's texts whose score moves as training goes on (on the tiny decoder it
    falls: the best checkpoint is then not the last one, which the test below makes use of when it happens)."""
    rows = [{"sentence1": f"question {i} about topic {i % 7}", "sentence2": f"answer {i} on topic {i % 7}",
             "score": 5.0} for i in range(10)]
    rows += [{"sentence1": f"question {i} about topic {i % 7}", "sentence2": f"answer {i + 3} on topic {(i + 3) % 7}",
              "score": 0.0} for i in range(10)]
    write_jsonl(folder / "test.jsonl", rows)
    return write_task_json(folder, "sts", min_score=0, max_score=5)


def _config(tmp_path, tiny, **train):
    dev = tmp_path / "dev"
    base = {"sources": [{"path": _labeled(tmp_path / "labeled.jsonl"), "task": "Answer the question"}],
            "synthetic": False, "batch_size": 8, "lr": 5e-3, "warmup_steps": 1, "progress": False, "engine": "torch",
            "eval_tasks": [{"path": str(_dev_sts(dev / "dev_sts"))}, {"path": str(toy_retrieval(dev / "toy_ret"))}]}
    base.update(train)
    # mean pooling: the random tiny decoder's last-token vectors are all but equal (an undefined Spearman)
    return {"run_dir": str(tmp_path / "run"), "model": {"name": str(tiny), "max_length": 32, "pooling": "mean",
                                                        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "train": base}


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # the train stage end to end, with two dev evaluations and two trackers (about 40 s)
def test_tracked_run_logs_to_mlflow_and_tensorboard_and_publishes_the_best_checkpoint(
        ray_cluster, tiny_decoder_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ray_e5.model import Embedder
    from ray_e5.train.run import train

    # keep_checkpoints 1: Ray Train keeps the best checkpoint (and the latest), never only the latest; bf16 autocast
    # as the one-hour recipe (the frozen weights held in bf16, the dev evaluations under the same autocast)
    config = _config(tmp_path, tiny_decoder_dir, max_steps=12, epochs=2, eval_every=4, checkpoint_every=100,
                     keep_checkpoints=1, keep_best="dev/mean", report_to=["mlflow", "tensorboard"],
                     cpu_autocast="bf16")
    result = train(RayE5Config.model_validate(config))
    run_dir = tmp_path / "run"

    lines = _lines(run_dir)
    losses = [m for m in lines if "loss" in m]
    evals = [m for m in lines if m.get("event") == "eval"]
    assert [m["step"] for m in losses] == list(range(1, 13))
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert all({"dev/dev_sts_spearman", "dev/toy_ret_ndcg_at_10", "dev/mean"} <= set(e) for e in evals)
    assert all(e["dev/mean"] == pytest.approx((e["dev/dev_sts_spearman"] + e["dev/toy_ret_ndcg_at_10"]) / 2, abs=1e-5)
               for e in evals)

    # The published embedder is the best evaluation's checkpoint (ties: the later), as the summary says.
    best = max(evals, key=lambda e: (e["dev/mean"], e["step"]))
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["published_step"] == best["step"] == result.published_step
    assert summary["published_by"]["metric"] == "dev/mean"
    assert summary["published_by"]["value"] == pytest.approx(best["dev/mean"], abs=1e-5)
    checkpoint = run_dir / "train" / summary["run_name"] / f"checkpoint-{best['step']:07d}"
    assert checkpoint.is_dir()  # num_to_keep did not delete it
    texts = ["question 3 about topic 3", "answer 5 on topic 5"]
    published = Embedder.load(run_dir / "embedder").encode(texts)
    np.testing.assert_allclose(published, Embedder.load(checkpoint / "embedder").encode(texts), atol=1e-6)
    if best["step"] != 12:  # and not the last one's
        last = run_dir / "train" / summary["run_name"] / "checkpoint-0000012"
        assert not np.allclose(published, Embedder.load(last / "embedder").encode(texts), atol=1e-5)

    # MLflow, read back with its own client: one loss point per logged step, the dev series, the config as params.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(f"file://{run_dir / 'train' / 'mlruns'}")
    runs = client.search_runs([client.get_experiment_by_name("ray-e5").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    loss = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == [m["step"] for m in losses]
    assert [m.value for m in sorted(loss, key=lambda m: m.step)] == pytest.approx([m["loss"] for m in losses])
    dev = client.get_metric_history(run_id, "dev/mean")
    assert len(dev) >= 2 and sorted(m.step for m in dev) == [4, 8, 12]
    assert {m.key for m in ("examples_per_s", "tokens_per_s", "lr") for m in client.get_metric_history(run_id, m)} \
        == {"examples_per_s", "tokens_per_s", "lr"}
    params = runs[0].data.params
    assert float(params["train/lr"]) == 5e-3 and params["train/keep_best"] == "dev/mean"
    assert not any("key" in name.lower() and "keep" not in name.lower() for name in params)

    # TensorBoard, read back with its EventAccumulator.
    events = EventAccumulator(str(run_dir / "train" / "tensorboard" / summary["run_name"]))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [m["step"] for m in losses]
    assert [e.step for e in events.Scalars("dev/mean")] == [4, 8, 12]
    assert "tokens_per_s" in events.Tags()["scalars"]


def test_tracker_fans_out_and_copies_its_logs_to_a_remote_run_dir(tmp_path, monkeypatch):
    """A run directory given as a URI (file:// here, as s3:// would be): the logs are written in a local temporary
    folder and copied under <run_dir>/train at each sync and at close."""
    from mlflow.tracking import MlflowClient

    from ray_e5.train.config import TrainSettings
    from ray_e5.train.tracking import open_tracker

    train_dir = f"file://{tmp_path / 'run' / 'train'}"
    tracker = open_tracker(TrainSettings(report_to=["mlflow", "tensorboard"]), train_dir, "run-a",
                           {"train": {"lr": 0.1}})
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 1.0 / step, "source": "not a number"})
    tracker.sync()
    assert (tmp_path / "run" / "train" / "tensorboard" / "run-a").is_dir()
    local = tracker.local_root
    tracker.close()
    assert not (local and __import__("os").path.exists(local))  # the temporary folder is gone
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(f"file://{tmp_path / 'run' / 'train' / 'mlruns'}")
    history = client.get_metric_history(tracker.state["mlflow_run_id"], "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert client.get_metric_history(tracker.state["mlflow_run_id"], "source") == []


def test_wandb_logs_offline(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (`pip install wandb`): its offline logging is not tested here")
    from ray_e5.train.config import TrainSettings
    from ray_e5.train.tracking import open_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = open_tracker(TrainSettings(report_to=["wandb"], wandb_project="ray-e5-test"), str(tmp_path / "train"),
                           "run-w", {"train": {"lr": 0.1}})
    tracker.log(1, {"loss": 0.5})
    tracker.close()
    assert list((tmp_path / "train" / "wandb").rglob("*.wandb"))


def test_a_missing_tracker_package_names_the_extra(monkeypatch):
    from ray_e5.train import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train\.report_to: mlflow needs the mlflow-skinny package; install it "
                                          r"with `pip install 'ray-e5\[tracking\]'`"):
        tracking.check_installed(["mlflow", "tensorboard"])
    tracking.check_installed(["tensorboard"])


def test_dev_evaluation_scores_with_the_evaluate_stage_and_checks_keep_best(tiny_decoder_dir, tmp_path):
    from ray_e5.model import Embedder
    from ray_e5.train.config import TrainSettings
    from ray_e5.train.deveval import evaluate, load_dev_tasks
    from ray_e5.train.run import _dev_tasks

    config = RayE5Config.model_validate(_config(tmp_path, tiny_decoder_dir, eval_every=2))
    tasks = load_dev_tasks(config.train.eval_tasks, config.data_dir)
    embedder = Embedder.load(str(tiny_decoder_dir), max_length=32, pooling="mean")
    embedder.train()
    scores = evaluate(embedder, tasks)
    assert embedder.training  # back in train mode
    assert set(scores) == {"dev/dev_sts_spearman", "dev/toy_ret_ndcg_at_10", "dev/mean"}
    assert 0.0 < scores["dev/toy_ret_ndcg_at_10"] <= 1.0 and -1.0 <= scores["dev/dev_sts_spearman"] <= 1.0
    assert scores["dev/mean"] == pytest.approx((scores["dev/toy_ret_ndcg_at_10"] + scores["dev/dev_sts_spearman"]) / 2)

    bad = config.model_copy(update={"train": config.train.model_copy(update={"keep_best": "dev/dev_sts_ndcg_at_10"})})
    with pytest.raises(ConfigError, match=r"train\.keep_best: 'dev/dev_sts_ndcg_at_10' is not a metric of the dev "
                                          r"evaluation; accepted: dev/dev_sts_spearman, dev/toy_ret_ndcg_at_10, dev/mean"):
        _dev_tasks(bad, bad.train)
    with pytest.raises(ConfigError, match=r"train\.eval_tasks\.0: .*MTEB Hub task"):
        load_dev_tasks(TrainSettings(eval_tasks=[{"name": "STS12"}]).eval_tasks, None)
    with pytest.raises(ConfigError, match=r"train\.eval_tasks\.0: .*does not exist"):
        load_dev_tasks(TrainSettings(eval_tasks=[{"path": "nowhere"}]).eval_tasks, str(tmp_path))


@pytest.mark.slow  # two workers (about 50 s each)
@pytest.mark.parametrize("engine,zero_stage", [("deepspeed", 3), ("torch", 2)], ids=["zero3-lockstep", "rank0-alone"])
def test_dev_evaluation_on_two_workers_does_not_deadlock(ray_cluster, tiny_decoder_dir, tmp_path, engine, zero_stage):
    """ZeRO-3 gathers each layer's weights collectively in every forward: every worker embeds the dev texts in
    lockstep and rank 0 keeps the scores. Otherwise rank 0 evaluates alone while the other worker waits in the
    checkpoint's report. Either way the run finishes, with one eval line per evaluation."""
    from ray_e5.train.run import train

    config = _config(tmp_path, tiny_decoder_dir, engine=engine, zero_stage=zero_stage, num_workers=2, max_steps=4,
                     eval_every=2, checkpoint_every=100, keep_best="dev/mean", max_failures=0)
    result = train(RayE5Config.model_validate(config))
    evals = [m for m in _lines(tmp_path / "run") if m.get("event") == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    assert result.published_step == max(evals, key=lambda e: (e["dev/mean"], e["step"]))["step"]
