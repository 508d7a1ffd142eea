"""Training data: row contract, readers with bad rows, weights, task-homogeneous batches, masks, the Ray plan."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_e5.data import (RowDefaults, SourceError, false_negative_mask, format_queries, labeled_source,
                         normalize_record, plan_group, plan_source, read_rows, synthetic_source)
from ray_e5.data.batching import build_plan

DEFAULTS = RowDefaults(source="src", task="Find the answer", kind="labeled", language="en")


def write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def triplets(n, prefix="q", negatives=True):
    return [{"query": f"{prefix} query {i}", "positive": f"{prefix} positive {i}",
             **({"negative": f"{prefix} negative {i}"} if negatives else {})} for i in range(n)]


# ---- the row contract ---------------------------------------------------------------------------------------
def test_normalize_triplet_takes_source_defaults_and_row_values():
    row = normalize_record({"query": "a", "positive": "b", "negative": "c"}, DEFAULTS)
    assert row == {"source": "src", "task": "Find the answer", "kind": "labeled", "language": "en",
                   "query": "a", "positive": "b", "negative": "c", "score": None, "problem": ""}
    own = normalize_record({"query": "a", "positive": "b", "task": "Own task", "kind": "short-long"}, DEFAULTS)
    assert (own["task"], own["kind"], own["negative"], own["problem"]) == ("Own task", "short-long", "", "")


@pytest.mark.parametrize("record, reason", [
    ({"query": "a"}, "missing positive"),
    ({"query": "a", "positive": "   "}, "empty positive"),
    ({"query": "", "positive": "b"}, "empty query"),
    ({"query": 3, "positive": "b"}, "query is int, expected a string"),
    ({"query": "a", "positive": "b", "negative": ["x"]}, "negative is list, expected a string"),
    ({"query": "a", "positive": "b", "task": 7}, "task is int, expected a string"),
    (["a", "b"], "record is list, expected an object"),
])
def test_bad_records_name_their_problem(record, reason):
    assert normalize_record(record, DEFAULTS)["problem"] == reason


def test_pairs_become_query_positive_and_min_score_filters():
    sts = RowDefaults(source="sts", task="Retrieve semantically similar text.", min_score=4.0)
    kept = normalize_record({"sentence1": "a", "sentence2": "b", "score": 4.2}, sts)
    assert (kept["query"], kept["positive"], kept["negative"], kept["problem"]) == ("a", "b", "", "")
    assert normalize_record({"sentence1": "a", "sentence2": "b", "score": 3.9}, sts)["problem"].startswith("filtered")
    assert "expected a number" in normalize_record({"sentence1": "a", "sentence2": "b", "score": "x"}, sts)["problem"]


def test_graded_sources_keep_scores_and_reject_what_is_not_a_scored_pair(tmp_path):
    records = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i / 2} for i in range(12)]
    records += [{"sentence1": "no score", "sentence2": "c"}, {"query": "a triplet", "positive": "d"},
                {"text": "a labeled text", "label": "x"}, {"sentence1": "e", "sentence2": "f", "score": float("nan")}]
    source = labeled_source(str(write_jsonl(tmp_path / "sts.jsonl", records)), name="sts-graded", graded=True)
    rows = read_rows(source).to_pylist()
    good = [r for r in rows if not r["problem"]]
    assert [r["score"] for r in good] == [i / 2 for i in range(12)]
    assert [r["query"] for r in good] == [f"a {i}" for i in range(12)]
    problems = [r["problem"] for r in rows if r["problem"]]
    assert len(problems) == 4 and all("graded (loss cosent)" in p for p in problems)
    assert all(r["score"] is None for r in rows if r["problem"])
    # Without grading the same pairs keep no score (and train with InfoNCE).
    assert all(r["score"] is None for r in read_rows(labeled_source(str(tmp_path / "sts.jsonl"))).to_pylist())
    # Graded batches carry the scores of their rows, in order.
    table, stats = plan_source(source, batch_size=4, epochs=1, seed=0)
    batches = table.to_pylist()
    assert stats["valid"] == 12 and len(batches) == 3
    by_query = {r["query"]: r["score"] for r in good}
    for batch in batches:
        assert batch["score"] == [by_query[q] for q in batch["query"]]
    plain, _ = plan_source(labeled_source(str(tmp_path / "sts.jsonl")), batch_size=4, epochs=1, seed=0)
    assert plain.num_rows >= 3 and all(b["score"] == [] for b in plain.to_pylist())


# ---- readers ------------------------------------------------------------------------------------------------
def test_jsonl_reader_skips_and_counts_bad_lines(tmp_path):
    folder = tmp_path / "nli"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps({"instruction_hint": "Given a premise, retrieve a hypothesis"}))
    good = triplets(5)
    write_jsonl(folder / "train.jsonl", good + [{"query": "x"}, {"query": 5, "positive": "y"}],
                raw_lines=["{not json", "[1, 2]"])
    source = labeled_source(str(folder))
    assert source.name == "nli" and source.defaults.task == "Given a premise, retrieve a hypothesis"
    rows = read_rows(source).to_pylist()
    assert [r["query"] for r in rows if not r["problem"]] == [g["query"] for g in good]
    assert all(r["task"] == "Given a premise, retrieve a hypothesis" for r in rows if not r["problem"])
    assert Counter(r["problem"] for r in rows if r["problem"]) == {
        "missing positive": 1, "query is int, expected a string": 1, "not valid JSON": 1,
        "record is list, expected an object": 1}


def test_source_errors_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        labeled_source(str(tmp_path / "absent.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="unsupported file type '.csv'"):
        labeled_source(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no train.jsonl"):
        labeled_source(str(tmp_path / "empty"))


def test_synthetic_parquet_source(tmp_path):
    assert synthetic_source(str(tmp_path)) is None
    shard = tmp_path / "synthetic" / "shard-00000.parquet"
    shard.parent.mkdir()
    rows = [{"task": f"Task {i % 3}", "kind": ["short-long", "sts"][i % 2], "language": "en", "query": f"q{i}",
             "positive": f"p{i}", "negative": f"n{i}" if i % 4 else None, "backend": "llama.cpp",
             "model": "gemma3-270m", "prompt_id": f"id{i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), shard)
    source = synthetic_source(str(tmp_path))
    out = read_rows(source).to_pylist()
    assert [r["kind"] for r in out] == [r["kind"] for r in rows]
    assert [r["negative"] for r in out] == [r["negative"] or "" for r in rows]
    assert all(r["problem"] == "" for r in out)


# ---- weights and task-homogeneous batches -------------------------------------------------------------------
def _group_table(n, source="src", kind="labeled"):
    rows = [normalize_record(t, RowDefaults(source=source, kind=kind)) for t in triplets(n)]
    return pa.Table.from_pylist(rows)


# 100 rows in batches of 16: six full batches, and the remainder is one smaller batch when it has >= 4 rows.
@pytest.mark.parametrize("weight, expected_used, partial", [(1.0, 100, 4), (0.5, 48, 0), (2.0, 200, 8)])
def test_weights_scale_how_much_of_a_source_is_used(weight, expected_used, partial):
    planned = plan_group(_group_table(100), batch_size=16, weights={"src": weight}, epochs=1, seed=0)
    batches = [r for r in planned.to_pylist() if r["size"]]
    stats = json.loads(planned.column("stats")[-1].as_py())
    assert stats["used"] == expected_used == sum(b["size"] for b in batches) == sum(len(b["query"]) for b in batches)
    assert sorted({b["size"] for b in batches} - {16}) == ([partial] if partial else [])
    assert stats["dropped_remainder"] == round(100 * weight) - expected_used
    assert stats["batches"] == len(batches)
    seen = Counter(q for b in batches for q in b["query"])
    assert max(seen.values()) == (2 if weight == 2.0 else 1)


@pytest.mark.parametrize("rows, multiple_of, expected", [(3, 1, 0), (10, 1, 10), (11, 2, 10), (11, 4, 8)])
def test_a_source_smaller_than_a_batch_still_trains(rows, multiple_of, expected):
    planned = plan_group(_group_table(rows), batch_size=64, weights={}, epochs=1, seed=0, min_batch=4,
                         multiple_of=multiple_of)
    sizes = [r["size"] for r in planned.to_pylist() if r["size"]]
    assert sizes == ([expected] if expected else [])
    assert json.loads(planned.column("stats")[-1].as_py())["used"] == expected


def test_plan_is_seeded_and_epochs_reshuffle():
    a = plan_group(_group_table(64), 16, {}, epochs=2, seed=1).to_pylist()
    b = plan_group(_group_table(64), 16, {}, epochs=2, seed=1).to_pylist()
    c = plan_group(_group_table(64), 16, {}, epochs=2, seed=2).to_pylist()
    assert [r["query"] for r in a] == [r["query"] for r in b]
    assert [r["query"] for r in a] != [r["query"] for r in c]
    epoch0 = [r["query"] for r in a if r["epoch"] == 0]
    epoch1 = [r["query"] for r in a if r["epoch"] == 1]
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))


def test_plan_source_batches_hold_one_kind(tmp_path):
    records = [{**t, "kind": "short-long" if i % 3 else "sts", "task": f"task {i % 5}"}
               for i, t in enumerate(triplets(60))]
    source = labeled_source(str(write_jsonl(tmp_path / "mixed.jsonl", records)))
    table, stats = plan_source(source, batch_size=8, epochs=1, seed=0)
    by_query = {r["query"]: r["kind"] for r in records}
    for batch in table.to_pylist():
        assert {by_query[q] for q in batch["query"]} == {batch["kind"]}
    assert stats["kinds"] == ["short-long", "sts"] and stats["valid"] == 60
    assert stats["used"] == sum(len(b) for b in table.column("query").to_pylist()) == 60  # 40 + 20: no remainder lost
    assert stats["used_by_kind"] == {"short-long": 40, "sts": 20}


# ---- instructions and false negatives -----------------------------------------------------------------------
def test_instruction_goes_on_queries_only():
    from ray_e5.train.step import prepare

    row = {"query": ["q0", "q1"], "positive": ["p0", "p1"], "negative": ["n0", ""], "task": ["Task A", "Task B"]}
    texts = prepare(row, rank=0, world=1, template="Instruct: {task}\nQuery: {text}")
    assert texts.queries == ["Instruct: Task A\nQuery: q0", "Instruct: Task B\nQuery: q1"]
    assert texts.positives == ["p0", "p1"] and texts.negatives == ["n0", ""]
    assert texts.negative_valid.tolist() == [True, False]
    assert format_queries(["q"], [""]) == ["q"]


def test_false_negative_mask():
    positives = ["cat", "dog", "cat"]
    documents = positives + ["dog", "bird", "fish"]  # negatives follow the positives
    mask = false_negative_mask(positives, documents)
    assert mask.tolist() == [
        [False, False, True, False, False, False],  # query 0: the other "cat" positive is masked, not its own
        [False, False, False, True, False, False],  # query 1: negative "dog" equals its positive
        [True, False, False, False, False, False],
    ]


# ---- the Ray plan -------------------------------------------------------------------------------------------
def test_build_plan_mixes_sources_in_homogeneous_global_batches(ray_cluster, tmp_path):
    nli = write_jsonl(tmp_path / "nli.jsonl", triplets(40, "nli") + [{"query": "only a query"}])
    sts = write_jsonl(tmp_path / "sts.jsonl", [{"sentence1": f"s{i}", "sentence2": f"t{i}", "score": i % 6}
                                               for i in range(60)])
    sources = [labeled_source(str(nli)), labeled_source(str(sts), name="sts", min_score=4.0, weight=2.0)]
    plan = build_plan(sources, batch_size=8, epochs=2, seed=0, min_batch=8)  # full batches only
    rows = list(plan.dataset.iter_rows())
    assert len(rows) == plan.steps
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows)
    for r in rows:
        prefix = "nli" if r["source"] == "nli" else "s"
        assert all(q.startswith(prefix) for q in r["query"]) and len(r["query"]) == 8
    assert {r["source"] for r in rows if r["epoch"] == 0} == {"nli", "sts"}
    assert plan.sources["nli"]["skipped"] == {"missing positive": 1}
    sts_valid = sum(1 for i in range(60) if i % 6 >= 4)
    assert plan.sources["sts"]["valid"] == sts_valid
    assert plan.sources["sts"]["used"] == 2 * (2 * sts_valid // 8 * 8)  # weight 2, two epochs
    assert plan.steps == (plan.sources["nli"]["used"] + plan.sources["sts"]["used"]) // 8


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
def test_a_share_makes_a_source_that_fraction_of_the_plan(ray_cluster, tmp_path, share):
    """train.synthetic_share: a small source is repeated (or a large one sampled) until it is ``share`` of the
    planned examples, whatever its size; the other sources are planned as their weights say."""
    nli = write_jsonl(tmp_path / "nli.jsonl", triplets(400, "nli"))
    small = write_jsonl(tmp_path / "small.jsonl", triplets(24, "syn"))
    sources = [labeled_source(str(nli)), labeled_source(str(small), name="synthetic")]
    plan = build_plan(sources, batch_size=8, epochs=2, seed=0, min_batch=8, shares={"synthetic": share})
    used = plan.sources["synthetic"]["used"]
    total = used + plan.sources["nli"]["used"]
    assert plan.sources["nli"]["used"] == 2 * 400
    assert abs(used / total - share) < 0.02, (used, total)
    assert plan.sources["synthetic"]["weight"] == pytest.approx(share / (1 - share) * 800 / 48, rel=1e-3)
    rows = list(plan.dataset.iter_rows())
    assert sum(len(r["query"]) for r in rows if r["source"] == "synthetic") == used > 0
    with pytest.raises(ValueError, match="shares name no source"):
        build_plan(sources, batch_size=8, shares={"synthetc": 0.5})


def test_stsb_train_pairs_above_min_score(shared_data):
    path = shared_data / "stsbenchmark" / "train.jsonl"
    expected = sum(1 for line in path.read_text().splitlines() if line.strip() and json.loads(line)["score"] >= 4)
    source = labeled_source(str(path), name="stsb", min_score=4.0)
    rows = read_rows(source).to_pylist()
    assert sum(1 for r in rows if not r["problem"]) == expected
    assert all(r["problem"].startswith("filtered") for r in rows if r["problem"])


def test_plan_by_task_keeps_one_instruction_per_batch(tmp_path):
    records = [{**t, "kind": "short-long", "task": f"task {i % 3}"} for i, t in enumerate(triplets(48))]
    source = labeled_source(str(write_jsonl(tmp_path / "tasks.jsonl", records)))
    table, stats = plan_source(source, batch_size=8, epochs=1, seed=0, batch_by="task")
    batches = table.to_pylist()
    assert len(batches) == 6 and stats["used"] == 48 and stats["kinds"] == ["short-long"]
    assert all(len(set(b["task"])) == 1 for b in batches)
    mixed, _ = plan_source(source, batch_size=8, epochs=1, seed=0, batch_by="kind")
    assert any(len(set(b["task"])) > 1 for b in mixed.to_pylist())  # by kind alone, tasks mix
    with pytest.raises(ValueError, match="batch_by"):
        plan_source(source, batch_size=8, epochs=1, seed=0, batch_by="language")


def test_labeled_texts_become_classification_examples_with_misleading_labels(tmp_path):
    records = [{"text": f"where is my card {i}", "label": "card_arrival"} for i in range(4)]
    records += [{"text": f"card delivery time {i}", "label": "card_delivery_estimate"} for i in range(4)]
    records += [{"text": f"exchange rate {i}", "label": "exchange_rate"} for i in range(4)]
    records += [{"text": "", "label": "exchange_rate"}, {"text": "no label here", "label": None}]
    source = labeled_source(str(write_jsonl(tmp_path / "train.jsonl", records)), task="Classify the intent")
    rows = read_rows(source).to_pylist()
    good = [r for r in rows if not r["problem"]]
    assert len(good) == 12 and {r["kind"] for r in good} == {"long-short"}
    assert {r["positive"] for r in good} == {"card arrival", "card delivery estimate", "exchange rate"}
    assert all(r["negative"] and r["negative"] != r["positive"] for r in good)
    # a label sharing a word with the true one is the misleading label when there is one
    assert all(r["negative"] == "card delivery estimate" for r in good if r["positive"] == "card arrival")
    assert all(r["task"] == "Classify the intent" for r in good)
    problems = sorted(r["problem"] for r in rows if r["problem"])
    assert problems[0] == "empty text" and "label is None" in problems[1]
