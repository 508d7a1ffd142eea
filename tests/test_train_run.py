"""The Ray Train job end to end on the tiny decoder: CLI, DeepSpeed on 2 workers, outputs, export, limits,
recovery from a killed worker, config errors."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ray_e5.cli import main
from ray_e5.config import ConfigError, RayE5Config
from ray_e5.model import Embedder


def _labeled(path, n=48, bad=True):
    rows = [{"query": f"question {i} about topic {i % 7}", "positive": f"answer {i} on topic {i % 7}",
             "negative": f"unrelated text {i}"} for i in range(n)]
    lines = [json.dumps(r) for r in rows]
    if bad:
        lines += [json.dumps({"query": "no positive"}), json.dumps({"query": "", "positive": "x"}), "{broken"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _synthetic(run_dir, n=32):
    shard = run_dir / "synthetic" / "part-0.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"task": "Given a claim, retrieve evidence", "kind": "short-long", "language": "en", "query": f"claim {i}",
         "positive": f"evidence paragraph {i}", "negative": "", "backend": "test", "model": "tiny",
         "prompt_id": str(i)} for i in range(n)]), shard)


def _config(tmp_path, tiny, **train):
    base = {"sources": [{"path": _labeled(tmp_path / "labeled.jsonl"), "task": "Answer the question"}],
            "batch_size": 8, "lr": 5e-3, "warmup_steps": 1, "checkpoint_every": 3, "progress": False,
            "engine": "torch", "max_failures": 2}
    base.update(train)
    return {"run_dir": str(tmp_path / "run"), "model": {"name": str(tiny), "max_length": 32,
                                                        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "train": base}


def _metrics(run_dir):
    out = []
    for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


@pytest.mark.slow
def test_train_cli_deepspeed_two_workers_end_to_end(ray_cluster, tiny_decoder_dir, tmp_path):
    config = _config(tmp_path, tiny_decoder_dir, engine="deepspeed", zero_stage=2, num_workers=2, chunk_size=4,
                     gradient_cache=True, max_steps=6, keep_checkpoints=2)
    run_dir = tmp_path / "run"
    _synthetic(run_dir)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 0

    # The embedder loads, and training changed its vectors.
    texts = ["question 3 about topic 3", "answer 3 on topic 3"]
    trained = Embedder.load(run_dir / "embedder")
    base = Embedder.load(str(tiny_decoder_dir), max_length=32)
    assert trained.settings.lora is not None
    assert not np.allclose(trained.encode(texts), base.encode(texts), atol=1e-4)

    metrics = [m for m in _metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[0]["lr"] == 0.0 and metrics[1]["lr"] == pytest.approx(5e-3)  # linear warmup, then decay
    assert metrics[-1]["lr"] < metrics[1]["lr"]
    assert all(m["examples_per_s"] > 0 and m["tokens_per_s"] > 0 and np.isfinite(m["loss"]) for m in metrics)
    assert {m["source"] for m in metrics} <= {"labeled", "synthetic"}
    assert (run_dir / "train" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((run_dir / "train" / "data.json").read_text())
    assert data["sources"]["labeled"]["skipped"] == {"missing positive": 1, "empty query": 1, "not valid JSON": 1}
    assert data["sources"]["synthetic"]["valid"] == 32
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["steps"] == 6 and not summary["stopped_early"]
    checkpoints = sorted(p for p in (run_dir / "train" / summary["run_name"]).glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-0000003", "checkpoint-0000006"]
    state = checkpoints[-1] / "deepspeed" / "state"
    assert {p.name for p in state.glob("zero_pp_rank_*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}

    # `ray-e5 export` merges the adapter into a model that gives the same vectors.
    assert main(["export", str(run_dir / "embedder"), "-o", str(tmp_path / "merged")]) == 0
    merged = Embedder.load(str(tmp_path / "merged"))
    np.testing.assert_allclose(merged.encode(texts), trained.encode(texts), atol=1e-4)


@pytest.mark.slow  # the train stage end to end on 2 workers (about 45 s)
def test_graded_source_trains_with_cosent_on_two_workers(ray_cluster, tiny_decoder_dir, tmp_path):
    """A ``loss: cosent`` source through the whole path (rows with scores, plan, Ray Data, two workers): its batches
    train with a finite loss, and a record that is not a scored pair is counted, not trained."""
    from ray_e5.train.run import train

    graded = tmp_path / "sts.jsonl"
    lines = [json.dumps({"sentence1": f"sentence {i} on topic {i % 4}", "sentence2": f"text {i} about {i % 4}",
                         "score": float(i % 6)}) for i in range(16)]
    lines += [json.dumps({"query": "a triplet", "positive": "x"}), json.dumps({"sentence1": "no", "sentence2": "score"})]
    graded.write_text("\n".join(lines) + "\n")
    config = _config(tmp_path, tiny_decoder_dir, num_workers=2, checkpoint_every=100)
    config["train"]["sources"].append({"path": str(graded), "name": "graded", "loss": "cosent"})
    path = train(RayE5Config.model_validate(config)).local_dir
    run_dir = tmp_path / "run"
    data = json.loads((run_dir / "train" / "data.json").read_text())
    assert data["sources"]["graded"]["valid"] == 16 and data["sources"]["graded"]["used"] == 16
    assert sum(data["sources"]["graded"]["skipped"].values()) == 2
    by_source = {}
    for m in _metrics(run_dir):
        if "loss" in m:
            by_source.setdefault(m["source"], []).append(m["loss"])
    assert len(by_source["graded"]) == 2 and len(by_source["labeled"]) == 6
    assert all(np.isfinite(x) and x > 0 for x in by_source["graded"])
    assert Embedder.load(path).encode(["sentence 1"]).shape == (1, 64)
    config["train"]["sources"][1]["loss"] = "mse"
    with pytest.raises(ConfigError, match=r"train\.sources\.1\.loss: .*'contrastive' or 'cosent'"):
        train(RayE5Config.model_validate(config))


def _train_workers():
    import ray._private.state

    return [a for a in ray._private.state.actors().values()  # GCS actor table: works without the dashboard
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tiny_decoder_dir, tmp_path):
    from ray_e5.train.run import train

    config = RayE5Config.model_validate(_config(tmp_path, tiny_decoder_dir, max_steps=120, epochs=20,
                                                checkpoint_every=10))
    run_dir = tmp_path / "run"
    outcome: dict = {}

    def run():
        try:
            outcome["path"] = train(config).local_dir
        except BaseException as err:  # surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and thread.is_alive():
        path = run_dir / "train" / "metrics.jsonl"
        steps = [m["step"] for m in _metrics(run_dir) if "loss" in m] if path.exists() else []
        if steps and steps[-1] >= 10:
            # Ray Train's controller registers a reported checkpoint when it next polls the workers (every 2 s);
            # a worker killed before that resumes from the checkpoint before.
            time.sleep(3)
            workers = _train_workers()
            assert len(workers) == 1
            os.kill(workers[0]["Pid"], signal.SIGKILL)
            killed_at = [m["step"] for m in _metrics(run_dir) if "loss" in m][-1]
            break
        time.sleep(0.05)
    assert killed_at is not None and killed_at < 120, "the run ended before a worker could be killed"
    thread.join(timeout=240)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert outcome["path"] == run_dir / "embedder"

    metrics = _metrics(run_dir)
    resumed = [m for m in metrics if m.get("event") == "resumed"]
    assert len(resumed) == 1
    resumed_step = resumed[0]["step"]
    assert resumed_step % 10 == 0 and 10 <= resumed_step <= killed_at
    # One history: every step once, the steps after the checkpoint re-done after the restart.
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 121))
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["steps"] == 120
    Embedder.load(run_dir / "embedder")


@pytest.mark.slow  # the train stage end to end (about 40 s)
def test_time_limit_stops_cleanly_with_what_is_trained(ray_cluster, tiny_decoder_dir, tmp_path):
    from ray_e5.train.run import train

    config = RayE5Config.model_validate(_config(tmp_path, tiny_decoder_dir, epochs=50, max_time_s=1.0))
    path = train(config).local_dir
    summary = json.loads((tmp_path / "run" / "train" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] < summary["planned_steps"]
    assert Embedder.load(path).encode(["question"]).shape == (1, 64)


def test_config_errors_name_the_key(ray_cluster, tiny_decoder_dir, tmp_path, capsys):
    from ray_e5.train.run import train

    def fails(overrides: dict, match: str):
        config = _config(tmp_path, tiny_decoder_dir)
        config["train"].update(overrides)
        with pytest.raises(ConfigError, match=match):
            train(RayE5Config.model_validate(config))

    fails({"sources": [{"path": str(tmp_path / "missing.jsonl")}]}, r"train\.sources\.0\.path: .*no such file")
    fails({"batch_size": 1000}, r"train\.batch_size: no full batch of 1000")
    fails({"num_workers": 3}, r"train\.num_workers: .*multiple of num_workers")
    fails({"bogus": 1}, r"train\.bogus: unknown key")
    fails({"sources": [], "synthetic": True}, r"train\.sources: no training data")
    # The CLI prints the same, with exit status 2.
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(tmp_path, tiny_decoder_dir)))
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--set", "train.temperature=0"]) == 2
    assert "train.temperature: Input should be greater than 0" in capsys.readouterr().err


@pytest.mark.slow  # the train stage end to end, twice (about 100 s)
def test_a_run_with_other_settings_starts_fresh_with_a_printed_reason(ray_cluster, tiny_decoder_dir, tmp_path,
                                                                         capsys):
    from ray_e5.train.run import train

    config = _config(tmp_path, tiny_decoder_dir, max_steps=2)
    train(RayE5Config.model_validate(config))
    first = json.loads((tmp_path / "run" / "train" / "run.json").read_text())
    capsys.readouterr()
    config["train"]["batch_size"] = 4  # as new synthetic shards change the plan: a new run, never an error
    train(RayE5Config.model_validate(config))
    out = capsys.readouterr().out
    assert f"starting a fresh run: {tmp_path / 'run' / 'train'} holds run {first['name']}" in out
    assert "changed: batch_size" in out
    saved = json.loads((tmp_path / "run" / "train" / "run.json").read_text())
    assert saved["name"] != first["name"] and saved["settings"]["batch_size"] == 4
    assert (tmp_path / "run" / "train" / first["name"]).is_dir()  # the old run's checkpoints are kept
    summary = json.loads((tmp_path / "run" / "train" / "summary.json").read_text())
    assert summary["run_name"] == saved["name"] and summary["steps"] == 2


@pytest.mark.slow  # the train stage end to end, twice, with MiniLM as a teacher (about 60 s)
def test_distillation_and_a_synthetic_share_through_the_train_stage(ray_cluster, tiny_decoder_dir, tmp_path):
    """``train.distill`` with the packaged MiniLM as teacher on the real path (plan, Ray Data, a worker): the first
    step's loss is the same step's loss without distillation plus a positive KL term; ``train.synthetic_share``
    makes the synthetic rows half of the examples planned, and the plan says so."""
    from ray_e5.train.run import train

    first = {}
    for name, extra in (("plain", {}), ("distilled", {"distill": {"teacher": "minilm-l6", "weight": 1.0}})):
        run_dir = tmp_path / name
        _synthetic(run_dir, n=8)
        config = _config(tmp_path, tiny_decoder_dir, max_steps=2, synthetic_share=0.5, seed=3, **extra)
        config["run_dir"] = str(run_dir)
        path = train(RayE5Config.model_validate(config)).local_dir
        data = json.loads((run_dir / "train" / "data.json").read_text())
        syn, labeled = data["sources"]["synthetic"], data["sources"]["labeled"]
        assert syn["valid"] == 8 and syn["used"] > 8 and abs(syn["used"] / (syn["used"] + labeled["used"]) - 0.5) < 0.1
        losses = [m["loss"] for m in _metrics(run_dir) if "loss" in m]
        assert len(losses) == 2 and all(np.isfinite(losses))
        first[name] = losses[0]
        assert Embedder.load(path).encode(["claim 1"]).shape == (1, 64)
    assert first["distilled"] > first["plain"] + 1e-4, first
