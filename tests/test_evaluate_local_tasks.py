"""Local tasks: every layout of ../shared/data loads into mteb's own task classes and scores through mteb;
bad folders raise an error naming the task."""

from __future__ import annotations

import json

import pytest
from scipy.stats import spearmanr

from ray_e5.evaluate.encoder import E5Encoder
from ray_e5.evaluate.local_tasks import LocalTaskError, load_local_task
from ray_e5.evaluate.worker import run_task
from ray_e5.testing.tasks import toy_tasks, write_jsonl, write_task_json
from ray_e5.model import Embedder


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return toy_tasks(tmp_path_factory.mktemp("toys"))


@pytest.fixture(scope="module")
def plain_encoder(tiny_decoder_dir):
    """Instructions off: texts that are equal embed equally, so the toy tasks have known scores."""
    return E5Encoder(Embedder.load(str(tiny_decoder_dir)), "tiny", use_instructions=False)


def _score(encoder, folder, **kwargs):
    record = run_task(encoder, load_local_task(folder, **kwargs))
    assert record["status"] == "ok", record.get("error")
    return record


def test_every_layout_scores_through_mteb(plain_encoder, toys):
    # retrieval / reranking / bitext / pair classification: each item's partner is the identical text
    for name, metric in [("toy_retrieval", "ndcg_at_10"), ("toy_reranking", "map_at_1000"),
                         ("toy_bitext", "f1"), ("toy_pair", "max_ap")]:
        record = _score(plain_encoder, toys[name])
        assert record["main_score"] == metric
        assert record["score"] == pytest.approx(1.0, abs=1e-6), name
    # STS: 6 identical pairs (gold 5) above 6 unrelated ones (gold 0); gold is binary, so the Spearman
    # correlation is fixed once the identical pairs rank first, whatever the order inside each group
    sts = _score(plain_encoder, toys["toy_sts"])
    expected = spearmanr([5] * 6 + [0] * 6, [10] * 6 + list(range(6)))[0]
    assert sts["main_score"] == "cosine_spearman" and sts["score"] == pytest.approx(expected, abs=1e-6)
    clf = _score(plain_encoder, toys["toy_classification"])
    assert clf["main_score"] == "accuracy" and 0.0 <= clf["score"] <= 1.0
    assert set(clf["result"]["scores"]) == {"test"}


def test_bitext_subsets_and_selection(plain_encoder, toys):
    task = load_local_task(toys["toy_bitext"])
    assert sorted(task.dataset) == ["deu-eng", "fra-eng"]
    assert task.metadata.eval_langs == {"deu-eng": ["deu", "eng"], "fra-eng": ["fra", "eng"]}
    one = load_local_task(toys["toy_bitext"], subsets=["fra-eng"])
    assert list(one.dataset) == ["fra-eng"]
    with pytest.raises(LocalTaskError, match=r"toy_bitext.*unknown subsets \['xxx-eng'\].*deu-eng"):
        load_local_task(toys["toy_bitext"], subsets=["xxx-eng"])


def test_classification_without_train_file_splits_seeded_halves(toys):
    a = load_local_task(toys["toy_classification"])
    b = load_local_task(toys["toy_classification"])
    train, test = a.dataset["default"]["train"], a.dataset["default"]["test"]
    assert len(train) == len(test) == 24
    assert not set(train["text"]) & set(test["text"])  # no scored text trains the probe
    assert train["text"] == b.dataset["default"]["train"]["text"]  # seeded


def test_subsampling_keeps_relevant_documents(toys):
    task = load_local_task(toys["toy_retrieval"], max_samples=3, max_corpus=5)
    split = task.dataset["default"]["test"]
    assert len(split["queries"]) == 3 and len(split["corpus"]) == 5
    relevant = {d for docs in split["relevant_docs"].values() for d in docs}
    assert relevant <= set(split["corpus"]["id"])


@pytest.mark.parametrize("case, message", [
    ("no_folder", "folder does not exist"),
    ("no_task_json", "missing task.json"),
    ("unknown_type", "unknown task type 'regression'; accepted: sts, retrieval"),
    ("empty_split", "split 'test' is empty"),
    ("no_split_file", "no data for split 'test'"),
    ("missing_corpus", "missing file corpus.jsonl"),
    ("missing_qrels", r"missing file qrels/test.tsv"),
    ("bad_row", "test.jsonl line 2 lacks \\['score'\\]"),
    ("bad_json", "test.jsonl line 1 is not JSON"),
])
def test_bad_folders_name_the_task(tmp_path, case, message):
    folder = tmp_path / case
    if case != "no_folder":
        folder.mkdir()
    if case == "unknown_type":
        write_task_json(folder, "regression")
    elif case in ("empty_split", "no_split_file", "bad_row", "bad_json"):
        write_task_json(folder, "sts")
        if case == "empty_split":
            (folder / "test.jsonl").write_text("\n")
        elif case == "bad_row":
            write_jsonl(folder / "test.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1},
                                                {"sentence1": "a", "sentence2": "b"}])
        elif case == "bad_json":
            (folder / "test.jsonl").write_text("{not json\n")
    elif case in ("missing_corpus", "missing_qrels"):
        write_task_json(folder, "retrieval")
        write_jsonl(folder / "queries.jsonl", [{"_id": "q", "text": "x"}])
        if case == "missing_qrels":
            write_jsonl(folder / "corpus.jsonl", [{"_id": "d", "text": "x"}])
    with pytest.raises(LocalTaskError, match=f"task '{case}'.*{message}"):
        load_local_task(folder)


def test_shared_data_layouts(shared_data):
    sts = load_local_task(shared_data / "stsbenchmark")
    assert len(sts.dataset["default"]["test"]) == 1379 and sts.metadata.type == "STS"
    multi = load_local_task(shared_data / "stsb_multi_mt", subsets=["de", "en"])
    assert multi.metadata.eval_langs == {"de": ["deu"], "en": ["eng"]}
    assert len(multi.dataset["de"]["test"]) == 1379
    sick = load_local_task(shared_data / "sick", max_samples=50)
    assert (sick.min_score, sick.max_score) == (1, 5) and len(sick.dataset["default"]["test"]) == 50
    scifact = load_local_task(shared_data / "scifact")
    split = scifact.dataset["default"]["test"]
    assert len(split["queries"]) == 300 and len(split["corpus"]) == 5183
    assert scifact.metadata.prompt == json.loads((shared_data / "scifact" / "task.json").read_text())["instruction_hint"]
    banking = load_local_task(shared_data / "banking77", max_samples=100)
    assert len(banking.dataset["default"]["train"]) == 10003 and len(banking.dataset["default"]["test"]) == 100
    tatoeba = load_local_task(shared_data / "tatoeba", subsets=["deu-eng", "cmn-eng"])
    assert tatoeba.metadata.eval_langs == {"deu-eng": ["deu", "eng"], "cmn-eng": ["cmn", "eng"]}
    mrpc = load_local_task(shared_data / "mrpc")
    assert set(mrpc.dataset["default"]["test"]["labels"]) == {0, 1}
    with pytest.raises(LocalTaskError, match="snli_triplets.*unknown task type 'triplets'"):
        load_local_task(shared_data / "snli_triplets")


def test_largest_task_is_scheduled_first(toys):
    from ray_e5.evaluate.config import TaskEntry
    from ray_e5.evaluate.tasks import largest_first, resolve_tasks
    from ray_e5.testing.tasks import SENTENCES

    entries = [TaskEntry(path=str(toys["toy_sts"])),
               TaskEntry(path=str(toys["toy_retrieval"]), name="toy_retrieval_small", max_samples=2, max_corpus=3),
               TaskEntry(path=str(toys["toy_retrieval"]))]
    sts, small, full = resolve_tasks(entries)
    # every corpus document and every query, ids not counted
    assert full.text_chars() == sum(map(len, SENTENCES)) + sum(map(len, SENTENCES[:8]))
    assert 0 < small.text_chars() < full.text_chars()
    pairs = [(a, a) for a in SENTENCES[:6]] + list(zip(SENTENCES[6:], SENTENCES[:6]))
    assert sts.text_chars() == sum(len(a) + len(b) for a, b in pairs)
    ordered = largest_first([small, full, sts])
    assert [t.text_chars() for t in ordered] == sorted((t.text_chars() for t in ordered), reverse=True)
    assert [t.name for t in ordered].index("toy_retrieval") < [t.name for t in ordered].index("toy_retrieval_small")


def test_fewer_classification_experiments_embed_fewer_training_texts(shared_data):
    from ray_e5.config import ConfigError
    from ray_e5.evaluate.config import TaskEntry
    from ray_e5.evaluate.tasks import resolve_tasks

    default, fewer = resolve_tasks([TaskEntry(path="banking77"), TaskEntry(path="banking77", name="banking77-2", n_experiments=2)],
                                   data_dir=str(shared_data))
    assert default.task.n_experiments == 10 and fewer.task.n_experiments == 2
    assert default.fingerprint != fewer.fingerprint  # a cached score of the other setting is not reused

    def union(task) -> int:
        split = task.dataset["default"] if "default" in task.dataset else task.dataset
        train, idxs, chosen = split["train"], None, set()
        for i in range(task.n_experiments):
            _, idxs, selected = task._undersample_data(train, i, idxs)
            chosen |= set(selected)
        return len(chosen)

    assert 0 < union(fewer.task) < union(default.task)
    with pytest.raises(ConfigError, match="n_experiments applies to classification"):
        resolve_tasks([TaskEntry(path="sick", n_experiments=2)], data_dir=str(shared_data))
