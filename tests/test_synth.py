"""Synthetic generation: taxonomy, planning, parsing, the fault-injecting server through the real openai client and
a real Ray Data pipeline, resume, bad config, and one end-to-end run on the real llama.cpp Gemma server."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ray_e5.config import ConfigError, RayE5Config
from ray_e5.synth.config import GenerateSettings
from ray_e5.synth.parse import Dropped, parse_json, validate_answer
from ray_e5.synth.run import generate, plan
from ray_e5.synth.taxonomy import KINDS, language_weights
from ray_e5.synth.testserver import FAULTS, TestServer


def _config(tmp_path, base_url, **generate_kw) -> RayE5Config:
    gen = {"backend": "endpoint", "base_url": base_url, "model": "test-model", "num_examples": 24, "max_retries": 3,
           "request_timeout_s": 2.0, "concurrency": 4, **generate_kw}
    return RayE5Config.model_validate({"run_dir": str(tmp_path / "run"), "generate": gen})


def _rows(tmp_path) -> list[dict]:
    shards = sorted((tmp_path / "run" / "synthetic").glob("*.parquet"))
    return [row for shard in shards for row in pq.read_table(str(shard)).to_pylist()]


def test_taxonomy_matches_the_paper():
    assert KINDS["short-long"].placeholders["num_words"] == [50, 100, 200, 300, 400, 500]
    assert KINDS["sts"].fixed_task == "Retrieve semantically similar text." and not KINDS["sts"].brainstorm
    assert KINDS["bitext"].placeholders["low_score"] == [1.5, 2, 2.5]
    assert KINDS["long-short"].output_keys == ("input_text", "label", "misleading_label")
    weights = language_weights(0.43)
    assert len(weights) >= 90 and abs(sum(weights.values()) - 1) < 1e-9 and weights["en"] == 0.43


def test_plan_is_seeded_and_mixes_kinds():
    settings = GenerateSettings(num_examples=300, mix={"short-long": 1, "sts": 1}, seed=3)
    first, again = plan(settings, {"short-long": ["Task A.", "Task B."]}), plan(settings, {"short-long": ["Task A.", "Task B."]})
    assert [i["id"] for i in first] == [i["id"] for i in again] and len({i["id"] for i in first}) == 300
    assert {i["kind"] for i in first} == {"short-long", "sts"}
    assert 0.3 < sum(i["language"] == "en" for i in first) / 300 < 0.56


@pytest.mark.parametrize("text, reason", [
    ("", "empty_answer"), ("Sure, here you go!", "not_json"), ('{"S1": "a", "S2": ', "truncated_json"),
    ('{"S1": "a" "S2": "b"}', "malformed_json"), ("[1, 2]", "not_an_object"),
])
def test_parse_drops_with_reasons(text, reason):
    with pytest.raises(Dropped) as err:
        validate_answer(parse_json(text), KINDS["sts"], 1, 1000)
    assert err.value.reason == reason


def test_validation_drops_bad_fields():
    for answer, reason in (({"S1": "a", "S2": "b"}, "missing_keys"), ({"S1": "a", "S2": "", "S3": "c"}, "empty_field"),
                           ({"S1": "a", "S2": ["b"], "S3": "c"}, "wrong_type")):
        with pytest.raises(Dropped, match=reason):
            validate_answer(answer, KINDS["sts"], 1, 1000)
    assert validate_answer(parse_json('```json\n{"S1": "a", "S2": "b", "S3": "c"}\n```'), KINDS["sts"], 1, 100)["S2"] == "b"


@pytest.mark.parametrize("bad, key", [
    ({"mix": {"poems": 1}}, "generate.mix"), ({"languages": ["en", "xx"]}, "generate.languages"),
    ({"num_examples": -5}, "generate.num_examples"), ({"backend": "openai", "api_key_env": "RAY_E5_NO_SUCH_KEY"}, "RAY_E5_NO_SUCH_KEY"),
])
def test_bad_config_is_refused_before_any_request(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RayE5Config.model_validate({"generate": bad}).section("generate", GenerateSettings)


def test_api_key_never_appears_in_errors(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    with pytest.raises(ConfigError) as err:
        RayE5Config.model_validate({"generate": {"backend": "openai", "temperature": -1}}).section("generate", GenerateSettings)
    assert "sk-secret-123" not in str(err.value)


def test_faults_are_dropped_and_counted_and_resume_repeats_nothing(ray_cluster, tmp_path):
    faults = ["ok", "ok", *FAULTS, "ok", "bad_body"]
    with TestServer(faults=faults, hang_s=5) as server:
        manifest = generate(_config(tmp_path, server.base_url, mix={"short-long": 1, "sts": 1, "long-short": 1}))
        calls_first = len(server.calls)
        rows = _rows(tmp_path)
        assert manifest["examples"] == len(rows) > 0
        assert len({r["id"] for r in rows}) == len(rows)
        for row in rows:
            assert row["query"] and row["positive"] and row["kind"] in KINDS and row["backend"] == "endpoint"
        drops = manifest["drops_this_run"]
        # 429/500/timeouts are retried by the openai client; content faults are dropped and named.
        assert {"missing_keys", "empty_field", "not_json"} <= set(drops) and "truncated_json" in drops or "malformed_json" in drops
        assert manifest["examples"] + sum(v for k, v in drops.items() if not k.startswith("brainstorm")) == 24
        assert manifest["tokens"]["prompt"] > 0
        # Resume: a rerun only asks for what was not written; no duplicates.
        generate(_config(tmp_path, server.base_url, mix={"short-long": 1, "sts": 1, "long-short": 1}))
        rerun_calls = len(server.calls) - calls_first
        again = _rows(tmp_path)
        assert len({r["id"] for r in again}) == len(again) >= len(rows)
        assert rerun_calls <= 24 - len(rows) + 3 * 4  # only the missing ones (plus their retries)


def test_time_budget_stops_cleanly(ray_cluster, tmp_path):
    with TestServer(latency_s=0.5, slots=1) as server:  # 60 examples need 30 s; the budget is 12 s
        manifest = generate(_config(tmp_path, server.base_url, mix={"sts": 1}, num_examples=60, time_budget_s=12,
                                    concurrency=2))
    assert 0 < manifest["examples"] < 60
    assert manifest["drops_this_run"]["skipped_time_budget"] == 60 - manifest["examples"]


@pytest.mark.slow
def test_end_to_end_llama_cpp_gemma(ray_cluster, tmp_path):
    config = RayE5Config.model_validate({"run_dir": str(tmp_path / "run"), "generate": {
        "backend": "llamacpp", "num_examples": 2, "mix": {"sts": 1}, "languages": ["en"], "max_tokens": 96,
        "temperature": 0.7, "concurrency": 2}})
    manifest = generate(config)
    assert manifest["tokens"]["completion"] > 0
    assert manifest["examples"] + sum(manifest["drops_this_run"].values()) == 2
    if manifest["examples"]:
        rows = _rows(tmp_path)
        assert all(r["kind"] == "sts" and r["query"] and r["positive"] and r["model"] == "gemma3-270m" for r in rows)
