"""The train section's tracking and dev-evaluation settings: what each accepts, and errors naming the key."""

from __future__ import annotations

import pytest

from ray_e5.config import ConfigError, RayE5Config


def _train(**train):
    return RayE5Config.model_validate({"run_dir": "runs/x", "train": train}).train


def test_defaults_are_off():
    train = _train()
    assert train.report_to == [] and train.eval_every is None and train.keep_best is None
    assert [e.path for e in train.eval_tasks] == ["stsbenchmark", "scifact"]  # an STS dev split, a retrieval subset
    assert train.eval_tasks[0].split == "dev"


def test_report_to_accepts_any_subset_and_names_the_accepted_ones():
    assert _train(report_to=["tensorboard", "mlflow", "tensorboard"]).report_to == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match=r"train\.report_to: .*'comet': not a tracker; accepted: mlflow, "
                                          r"tensorboard, wandb"):
        _train(report_to=["mlflow", "comet"])


def test_eval_every_is_off_at_zero_and_at_least_one_when_set():
    assert _train(eval_every=0).eval_every is None
    assert _train(eval_every=5).eval_every == 5
    with pytest.raises(ConfigError, match=r"train\.eval_every: .*must be >= 1"):
        _train(eval_every=-2)


def test_keep_best_needs_eval_every_and_a_dev_metric():
    assert _train(eval_every=10, keep_best="dev/mean").keep_best == "dev/mean"
    assert _train(eval_every=10, keep_best="dev/scifact_ndcg_at_10").keep_best == "dev/scifact_ndcg_at_10"
    with pytest.raises(ConfigError, match=r"train\.keep_best: .*needs train\.eval_every"):
        _train(keep_best="dev/mean")
    with pytest.raises(ConfigError, match=r"train\.keep_best: .*'loss' is not a metric the dev evaluation produces; "
                                          r"accepted: dev/mean, dev/stsbenchmark_<metric>, dev/scifact_<metric>"):
        _train(eval_every=10, keep_best="loss")
    named = _train(eval_every=10, keep_best="dev/sts_spearman",
                   eval_tasks=[{"path": "stsbenchmark", "split": "dev", "name": "sts"}])
    assert named.keep_best == "dev/sts_spearman"


def test_eval_tasks_take_evaluate_task_entries_but_no_passkey():
    train = _train(eval_every=5, eval_tasks=[{"path": "stsbenchmark", "split": "dev", "max_samples": 50},
                                             {"hf": "mteb/sickr-sts", "type": "sts", "max_samples": 50}])
    assert train.eval_tasks[1].type == "sts"
    with pytest.raises(ConfigError, match=r"train\.eval_tasks: .*passkey"):
        _train(eval_tasks=[{"type": "passkey"}])
