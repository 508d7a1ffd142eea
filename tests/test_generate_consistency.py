"""Consistency filtering of synthetic rows: the judgement, its record, and the training reader honouring it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ray_e5.generate.consistency import NEGATIVE_ABOVE, NOT_IN_TOP_K, judge, quality


def _embed_table(table: dict[str, list[float]]):
    def embed(texts):
        vectors = np.array([table[t] for t in texts], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return embed


def test_judge_drops_a_negative_above_its_positive_and_a_positive_outside_the_top_k():
    # 2-d vectors at chosen angles: q0 is nearest its own positive; q1's negative beats its positive; q2's positive
    # is further from q2 than two other rows' positives are.
    angle = {"q0": 0, "p0": 5, "n0": 40, "q1": 90, "p1": 130, "n1": 95, "q2": 180, "p2": 260, "n2": 300,
             "q3": 200, "p3": 190, "n3": 250, "q4": 170, "p4": 175, "n4": 100}
    table = {k: [np.cos(np.radians(a)), np.sin(np.radians(a))] for k, a in angle.items()}
    rows = [{"id": f"r{i}", "kind": "sts", "query": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"}
            for i in range(5)]
    dropped = judge(rows, _embed_table(table), top_k=2, pool=10)
    assert dropped == {"r1": NEGATIVE_ABOVE, "r2": NOT_IN_TOP_K}
    # a pool too small for the rank check passes every row the margin check passes
    assert judge(rows, _embed_table(table), top_k=10, pool=10) == {"r1": NEGATIVE_ABOVE}
    # rows are only ranked against their own kind
    rows[3]["kind"] = rows[4]["kind"] = "long-short"
    assert judge(rows, _embed_table(table), top_k=1, pool=10).get("r2") in (None, NOT_IN_TOP_K)
    report = quality(rows, dropped)
    assert report["sts"]["rows"] == 3 and report["sts"]["consistency_dropped"] == {NEGATIVE_ABOVE: 1, NOT_IN_TOP_K: 1}
    assert report["long-short"]["consistency_kept_share"] == 1.0


@pytest.mark.slow
def test_the_stage_records_its_drops_and_training_skips_them(ray_cluster, tmp_path):
    from ray_e5.config import RayE5Config
    from ray_e5.data.schema import FILTERED_PREFIX
    from ray_e5.data.sources import read_rows, synthetic_source
    from ray_e5.generate.run import generate
    from ray_e5.testing.openai_server import TestServer

    with TestServer() as server:
        config = RayE5Config.model_validate({"run_dir": str(tmp_path / "run"), "generate": {
            "backend": "endpoint", "base_url": server.base_url, "model": "test-model", "num_examples": 24,
            "mix": {"sts": 1}, "languages": ["en"], "concurrency": 4, "progress": False,
            "consistency": {"model": "minilm-l6", "top_k": 1, "pool": 24}}})
        manifest = generate(config).manifest
    record = json.loads((tmp_path / "run" / "synthetic" / "consistency.json").read_text())
    dropped = record["dropped"]
    assert manifest["examples"] > 1 and manifest["consistency"]["rows"] == manifest["examples"]
    assert manifest["consistency"]["dropped"] == len(dropped) >= 1  # top-1 of 24 random-word rows: most fail
    assert record["settings"]["top_k"] == 1
    assert manifest["quality_by_kind"]["sts"]["rows"] == manifest["examples"]
    card = (tmp_path / "run" / "synthetic" / "README.md").read_text()
    assert f"{len(dropped)} of {manifest['examples']} rows marked dropped" in card
    source = synthetic_source(str(tmp_path / "run"))
    rows = read_rows(source).to_pylist()
    filtered = [r for r in rows if r["problem"].startswith(FILTERED_PREFIX + "consistency_")]
    assert len(rows) == manifest["examples"] and len(filtered) == len(dropped)
