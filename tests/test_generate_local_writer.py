"""The in-process batched writer (``generate.backend: transformers``) on the packaged Gemma 3 270M."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from ray_e5.config import RayE5Config
from ray_e5.generate.completions import batches_by_kind
from ray_e5.generate.prompts import answer_text, completion_prompt
from ray_e5.generate.taxonomy import KINDS

STS = {"unit": "sentence", "high_score": 4, "low_score": 2, "difficulty": "high school"}


@pytest.fixture(scope="module")
def sampler():
    from ray_e5.generate.local_writer import BatchedSampler

    return BatchedSampler("gemma3-270m", threads=2, seed=1)


def _prompts(n: int) -> list[str]:
    topics = ("cooking", "football", "birds", "banking", "weather", "pets", "travel", "music")
    return [completion_prompt(KINDS["sts"], "Retrieve semantically similar text.", "en",
                              {**STS, "topic": topics[i % len(topics)]}) for i in range(n)]


@pytest.mark.slow
def test_a_batch_of_answers_each_ends_at_its_own_line_or_limit(sampler):
    prompts = _prompts(6)
    limits = [64, 64, 64, 8, 8, 8]  # three answers may not pass 8 tokens: they end by length
    out = sampler.sample(prompts, limits, temperature=0.8, top_p=0.95)
    assert len(out) == 6
    for answer, limit in zip(out, limits):
        assert "\n" not in answer.text  # an answer ends at its line
        assert 0 < answer.completion_tokens <= limit and answer.prompt_tokens > 100
        assert answer.finish_reason in ("stop", "length")
    assert all(a.finish_reason == "length" and a.completion_tokens == 8 for a in out[3:]), out[3:]
    whole = sum(1 for p, a in zip(prompts[:3], out[:3]) if a.finish_reason == "stop")
    assert whole >= 1  # the 270M writer closes most of its lines within 64 tokens


@pytest.mark.slow
def test_complete_ends_an_answer_at_its_closed_json_object(sampler):
    prompts = _prompts(4)
    seen = Counter()

    def whole(i: int, text: str) -> bool:
        seen[i] += 1
        try:
            json.loads(answer_text(prompts[i], text))
            return True
        except ValueError:
            return False

    out = sampler.sample(prompts, [96] * 4, temperature=0.8, top_p=0.95, complete=whole)
    closed = [a for i, a in enumerate(out) if seen[i] and a.finish_reason == "stop"]
    assert closed, (seen, out)
    for i, answer in enumerate(out):
        if answer.finish_reason == "stop" and seen[i]:
            text = answer_text(prompts[i], answer.text)
            if text.rstrip().endswith("}"):
                assert isinstance(json.loads(text), dict)  # nothing after the closed object was written


@pytest.mark.slow
def test_a_passed_deadline_ends_the_answers_still_being_written(sampler):
    out = sampler.sample(_prompts(3), [96] * 3, temperature=0.8, top_p=0.95, deadline=time.time() - 1)
    assert [a.finish_reason for a in out].count("deadline") >= 1
    assert all(a.finish_reason in ("deadline", "stop", "length") for a in out)


@pytest.mark.slow
def test_a_shared_prompt_prefix_is_computed_once_and_changes_no_answer(monkeypatch):
    from ray_e5.generate import local_writer

    exact = local_writer.BatchedSampler("gemma3-270m", threads=2, dtype="float32")
    shapes = []
    exact.model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                          with_kwargs=True)
    prompts = _prompts(4)
    shared = exact.sample(prompts, [24] * 4, temperature=0)  # greedy: the same tokens either way
    prefix, tails = shapes[0], shapes[1]
    assert prefix[0] == 1 and prefix[1] >= 100, shapes  # the worked example, once
    assert tails[0] == 4 and tails[1] < prefix[1]  # then each prompt's own tail
    monkeypatch.setattr(local_writer, "MIN_SHARED_PREFIX", 10 ** 9)
    shapes.clear()
    whole = exact.sample(prompts, [24] * 4, temperature=0)
    assert shapes[0][0] == 4 and shapes[0][1] > prefix[1]  # every prompt whole
    assert [a.text for a in shared] == [a.text for a in whole]
    assert all(a.completion_tokens > 0 for a in shared)


def test_batches_hold_one_kind_and_the_kinds_take_turns():
    items = [{"id": f"a{i}", "kind": "sts"} for i in range(5)] + [{"id": f"b{i}", "kind": "long-short"}
                                                                 for i in range(3)]
    ordered = batches_by_kind(items, 2)
    assert sorted(i["id"] for i in ordered) == sorted(i["id"] for i in items)
    assert [i["kind"] for i in ordered] == ["sts", "sts", "long-short", "long-short", "sts", "sts",
                                            "long-short", "sts"]


def test_the_transformers_writer_refuses_chat_prompts():
    from ray_e5.settings import ConfigError

    with pytest.raises(ConfigError, match="prompt_style 'completion' or 'auto'"):
        RayE5Config.model_validate({"run_dir": "/tmp/x", "generate": {"backend": "transformers",
                                                                      "prompt_style": "chat"}})


@pytest.mark.slow
def test_end_to_end_in_process_writer(ray_cluster, tmp_path):
    from ray_e5.generate.run import generate

    kinds = {"sts": 1, "long-short": 1}
    config = RayE5Config.model_validate({"run_dir": str(tmp_path / "run"), "generate": {
        "backend": "transformers", "num_examples": 16, "mix": kinds, "languages": ["en"], "max_tokens": 128,
        "brainstorm_max_tokens": 200, "temperature": 0.8, "writer_batch": 8, "actor_cpus": 2, "progress": False}})
    manifest = generate(config).manifest
    assert manifest["tokens"]["completion"] > 0 and manifest["model"] == "gemma3-270m"
    import pyarrow.parquet as pq

    rows = [r for shard in sorted((tmp_path / "run" / "synthetic").glob("part-*.parquet"))
            for r in pq.read_table(shard).to_pylist()]
    assert len(rows) == manifest["examples"] > 0
    by_kind = Counter(r["kind"] for r in rows)
    assert all(by_kind[k] >= 1 for k in kinds), (by_kind, manifest["drops_this_run"])
    for row in rows:
        assert row["query"].strip() and row["positive"].strip() and row["backend"] == "transformers"
        assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0
    # every planned request is accounted for: written or dropped with a reason
    assert manifest["examples"] + sum(manifest["drops_this_run"].values()) >= 16
