"""Hard-negative mining (``train.mine``): the search's filters on known vectors, then MiniLM mining real STS-B train
pairs over Ray Data, its cache, the training plan it feeds, and the config errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from ray_e5.config import ConfigError, RayE5Config
from ray_e5.data.mining import mine_sources, mine_table, search
from ray_e5.data.schema import rows_table
from ray_e5.train.config import MineSettings


def _unit(*rows):
    a = np.array(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_search_skips_positives_false_negatives_and_the_top_ranks():
    query = _unit([1.0, 0.0, 0.0])
    positive = _unit([0.9, 0.1, 0.0])
    # corpus: 0 the positive, 1 a near-duplicate of it (a likely false negative), 2 a hard negative, 3 an easy one
    corpus = _unit([0.9, 0.1, 0.0], [0.9, 0.11, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0])
    pos_score = float(query[0] @ positive[0])
    for margin, expected in ((0.05, 2), (0.0, 1)):
        chosen, summary = search(query, positive, corpus, [[0]], top_k=3, skip_top=0, relative_margin=margin,
                                 sampling="top", seed=0)
        assert chosen == [expected], (margin, chosen)
        assert summary["mean_negative_score"] <= pos_score * (1 - margin) + 1e-6
    assert search(query, positive, corpus, [[0]], 3, 2, 0.05, "top", 0)[0] == [3]
    # without the easy document, a margin of 0.5 leaves no candidate: the row keeps what it had (-1)
    assert search(query, positive, corpus[:3], [[0]], 3, 0, 0.5, "top", 0)[0] == [-1]
    # random sampling draws among the passing candidates only, reproducibly
    draws = {search(query, positive, corpus, [[0]], 3, 0, 0.05, "random", seed)[0][0] for seed in range(20)}
    assert draws == {2, 3}


def _sts_rows(shared_data, n=60):
    rows = []
    for line in (shared_data / "stsbenchmark" / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["score"] >= 4.0:
            rows.append({"source": "stsb", "task": "Retrieve semantically similar text.", "kind": "sts",
                         "language": "en", "query": record["sentence1"], "positive": record["sentence2"],
                         "negative": "", "problem": ""})
        if len(rows) == n:
            break
    rows.append({**rows[0], "query": "", "positive": "", "problem": "empty query"})  # a counted problem stays
    return rows_table(rows)


@pytest.mark.slow  # the real MiniLM mines over Ray Data (about 110 s on 2 loaded cores)
def test_minilm_mines_sts_pairs_over_ray_data_and_caches(ray_cluster, shared_data, tmp_path):
    rows = _sts_rows(shared_data)
    settings = MineSettings(num_workers=2, batch_size=16)
    model = {"reference": "minilm-l6", "overrides": {}}
    mined, stats = mine_table(rows, model, settings)
    assert stats["considered"] == 60 and stats["mined"] >= 50, stats
    assert stats["kinds"]["sts"]["mean_negative_score"] < stats["kinds"]["sts"]["mean_positive_score"]
    positives = rows.column("positive").to_pylist()
    for query, positive, negative, problem in zip(*(mined.column(c).to_pylist()
                                                    for c in ("query", "positive", "negative", "problem"))):
        if problem:
            assert negative == ""  # the bad row is kept, untouched, for the plan to count
            continue
        if negative:
            assert negative != positive and negative != query and negative in positives

    logs: list[str] = []
    first = mine_sources({"stsb": rows}, model, settings, str(tmp_path / "mined"), log=logs.append)
    again = mine_sources({"stsb": rows}, model, settings, str(tmp_path / "mined"), log=logs.append)
    assert first["stsb"].equals(again["stsb"]) and first["stsb"].equals(mined)
    assert "texts embedded" in logs[0] and "(from " in logs[1], logs
    assert len(list((tmp_path / "mined").glob("stsb-*.parquet"))) == 1

    # The plan is cut from the mined rows: its batches carry every mined negative, and the bad row is counted (all 60 rows fit in batches of 8 and one of 4).
    from ray_e5.data.batching import build_plan
    from ray_e5.data.schema import RowDefaults
    from ray_e5.data.sources import Source

    source = Source("stsb", "jsonl", (), pafs.LocalFileSystem(), RowDefaults("stsb"))
    plan = build_plan([source], batch_size=8, rows={"stsb": mined})
    planned = [n for batch in plan.dataset.take_all() for n in batch["negative"] if n]
    assert len(planned) == stats["mined"] and plan.skipped == 1, (len(planned), plan.skipped)

    with pytest.raises(RuntimeError, match=r"train\.mine: no hard negative .*mine\.relative_margin"):
        mine_sources({"stsb": rows}, model, MineSettings(top_k=1, relative_margin=0.99, num_workers=1),
                     str(tmp_path / "strict"), log=logs.append)


@pytest.mark.slow  # the train stage end to end (about 50 s)
def test_train_mines_before_planning_and_names_bad_sources(ray_cluster, tiny_decoder_dir, tmp_path):
    from ray_e5.train.run import train

    sources = tmp_path / "pairs.jsonl"
    sources.write_text("\n".join(json.dumps({"sentence1": f"sentence {i} about topic {i % 5}",
                                             "sentence2": f"another sentence {i} on topic {i % 5}", "score": 4.5})
                                 for i in range(32)) + "\n")
    config = {"run_dir": str(tmp_path / "run"),
              "model": {"name": str(tiny_decoder_dir), "max_length": 32, "pooling": "mean",
                        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
              "train": {"sources": [{"path": str(sources), "name": "pairs", "kind": "sts", "task": "Find the pair"}],
                        "batch_size": 8, "max_steps": 2, "warmup_steps": 1, "progress": False, "engine": "torch",
                        "mine": {"sources": ["pairs"], "relative_margin": 0.0}}}
    train(RayE5Config.model_validate(config))
    meta = [json.loads(p.read_text()) for p in (tmp_path / "run" / "train" / "mined").glob("pairs-*.json")]
    assert len(meta) == 1 and meta[0]["mined"] > 0, meta

    config["train"]["mine"] = {"sources": ["nope"]}
    with pytest.raises(ConfigError, match=r"train\.mine\.sources: \['nope'\] name no training source; accepted: pairs"):
        train(RayE5Config.model_validate(config))
    config["train"]["mine"] = {"relative_margin": 1.5}
    with pytest.raises(ConfigError, match=r"train\.mine\.relative_margin"):
        train(RayE5Config.model_validate(config))
