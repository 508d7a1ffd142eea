"""Multilingual evaluation with the real Gemma 3 270M: Tatoeba (BitextMining) and STS-B multilingual scored per
language through ray-e5 equal mteb run directly (on the sentence-transformers export of the same model), and the
report's per-language rows are those scores."""

from __future__ import annotations

import pytest

from ray_e5.evaluate.local_tasks import load_local_task

pytestmark = pytest.mark.slow

CASES = [("tatoeba", ["deu-eng", "fra-eng", "swh-eng"], 40), ("stsb_multi_mt", ["de", "ja"], 60)]


@pytest.fixture(scope="module")
def gemma_st(gemma, tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    from ray_e5.model.export import export_sentence_transformers

    return SentenceTransformer(str(export_sentence_transformers(gemma, tmp_path_factory.mktemp("st") / "gemma")),
                               device="cpu")


@pytest.mark.parametrize("name, subsets, samples", CASES)
def test_per_language_scores_match_mteb_direct(shared_data, gemma, gemma_st, name, subsets, samples):
    import mteb

    from ray_e5.evaluate.encoder import E5Encoder
    from ray_e5.evaluate.report import build_report, markdown
    from ray_e5.evaluate.worker import run_task

    def task():
        return load_local_task(shared_data / name, subsets=subsets, max_samples=samples)

    record = run_task(E5Encoder(gemma, "gemma3-270m", use_instructions=False), task(), batch_size=16)
    assert record["status"] == "ok", record.get("error")
    direct = mteb.evaluate(gemma_st, task(), cache=None, co2_tracker=False, show_progress_bar=False,
                           encode_kwargs={"batch_size": 16}).task_results[0]
    theirs = {e["hf_subset"]: 100 * e["main_score"] for e in direct.scores["test"]}

    md = task().metadata
    report = build_report([{"label": "gemma3-270m", "ref": "gemma3-270m"}],
                          [{"name": md.name, "type": md.type, "main_score": md.main_score, "local": True}],
                          {"gemma3-270m": {md.name: record}})
    rows = report["languages"][md.name]
    assert rows["subsets"] == sorted(subsets) and rows["category"] == md.type
    ours = rows["scores"]["gemma3-270m"]
    print(f"{name}: ray-e5 {ours}  mteb+sentence-transformers {theirs}")
    for subset in subsets:
        assert abs(ours[subset] - theirs[subset]) <= 0.5, subset
    assert len({round(v, 2) for v in ours.values()}) > 1  # languages differ: these are not one score copied
    floor = 100 / samples if md.type == "BitextMining" else 0.0  # chance F1 of nearest-neighbour matching
    assert sum(ours.values()) / len(ours) > floor
    text = markdown(report)
    assert f"## By language: {md.name} ({md.type})" in text
    assert all(f"| {s} | " in text for s in subsets)
    if md.type == "BitextMining":
        assert report["categories"]["gemma3-270m"]["BitextMining"] == pytest.approx(record["score"] * 100, abs=1e-3)
