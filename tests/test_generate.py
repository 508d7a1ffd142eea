"""Synthetic generation: the paper's taxonomy, planning, parsing, filters, the ledger and the vLLM processor; then the
real Ray Data pipeline through the real openai client against the fault-injecting test server (faults counted, no
valid row lost, a real kill and resume, time and money budgets, the API key kept out of everything), the CLI, and
one end-to-end run on the real llama.cpp server with the packaged Gemma."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_e5.config import ConfigError, RayE5Config, load_config
from ray_e5.generate.config import GenerateSettings
from ray_e5.generate.parse import Dropped, parse_json, validate_answer
from ray_e5.generate.plan import brainstorm_requests, expand, per_brainstorm, plan_slots
from ray_e5.generate.run import generate
from ray_e5.generate.taxonomy import KINDS, LANGUAGE_NAMES, LANGUAGES, language_weights
from ray_e5.testing.generate import generation_driver
from ray_e5.testing.openai_server import FAULTS, TestServer

ROOT = Path(__file__).resolve().parents[1]
BRAINSTORM_OPENING = "Think up a list"


def _config(tmp_path, base_url, **generate_kw) -> RayE5Config:
    gen = {"backend": "endpoint", "base_url": base_url, "model": "test-model", "num_examples": 24, "max_retries": 3,
           "request_timeout_s": 2.0, "concurrency": 4, "progress": False, **generate_kw}
    return RayE5Config.model_validate({"run_dir": str(tmp_path / "run"), "generate": gen})


def _rows(tmp_path) -> list[dict]:
    shards = sorted((tmp_path / "run" / "synthetic").glob("*.parquet"))
    return [row for shard in shards for row in pq.read_table(str(shard)).to_pylist()]


def _example_calls(calls):
    return [c for c in calls if not c.prompt.startswith(BRAINSTORM_OPENING)]


# ---- the taxonomy and the plan ---------------------------------------------------------------------------------
def test_taxonomy_matches_the_paper():
    sl, ls, sts, bt = KINDS["short-long"], KINDS["long-short"], KINDS["sts"], KINDS["bitext"]
    assert sl.placeholders == {"query_type": ["extremely long-tail", "long-tail", "common"],
                               "query_length": ["less than 5 words", "5 to 15 words", "at least 10 words"],
                               "clarity": ["clear", "understandable with some effort", "ambiguous"],
                               "num_words": [50, 100, 200, 300, 400, 500], "difficulty": ["high school", "college", "PhD"]}
    assert sl.output_keys == ("user_query", "positive_document", "hard_negative_document")
    assert ls.placeholders["num_words"] == ["less than 10", "at least 10", "at least 50", "at least 100", "at least 200"]
    assert ls.output_keys == ("input_text", "label", "misleading_label")
    assert KINDS["short-short"].output_keys == KINDS["long-long"].output_keys == ("input", "positive_document")
    assert KINDS["long-long"].min_words == 300
    assert sts.placeholders["high_score"] == [4, 4.5, 5] and sts.placeholders["low_score"] == [2.5, 3, 3.5]
    assert bt.placeholders["high_score"] == [4, 4.5, 5] and bt.placeholders["low_score"] == [1.5, 2, 2.5]
    assert sts.placeholders["difficulty"] == ["elementary school", "high school", "college"]
    assert sts.output_keys == bt.output_keys == ("S1", "S2", "S3")
    assert (sts.fixed_task, bt.fixed_task) == ("Retrieve semantically similar text.", "Retrieve parallel sentences.")
    assert {k for k, kind in KINDS.items() if kind.brainstorm} == {"short-long", "long-short", "short-short", "long-long"}
    assert len(LANGUAGES) == 93 and all(LANGUAGE_NAMES[c] and LANGUAGE_NAMES[c] != c for c in LANGUAGES)


def test_language_weights_favour_high_resource_and_are_configurable():
    w = language_weights(0.43)
    assert abs(sum(w.values()) - 1) < 1e-9 and w["en"] == pytest.approx(0.43)
    assert w["zh"] > w["cs"] > w["sw"] > 0
    assert language_weights(0.6, only=["en", "de"])["en"] == pytest.approx(0.6 / (0.6 + w["de"] / 0.57 * 0.4))
    assert language_weights(explicit={"fr": 3, "de": 1}) == {"fr": 0.75, "de": 0.25}


def test_plan_is_seeded_stable_under_extension_and_follows_the_mix():
    settings = GenerateSettings(num_examples=600, seed=3)
    slots = plan_slots(settings)
    assert slots == plan_slots(settings) and slots != plan_slots(settings.model_copy(update={"seed": 4}))
    assert plan_slots(settings.model_copy(update={"num_examples": 800}))[:600] == slots  # more examples: appended
    counts = Counter(s.kind for s in slots)
    total = sum(settings.mix.values())
    for kind, weight in settings.mix.items():  # smooth round-robin: within one example of the exact share
        assert abs(counts[kind] - 600 * weight / total) <= 1, kind
    assert 0.36 < sum(s.language == "en" for s in slots) / 600 < 0.50
    requests = brainstorm_requests(settings, slots)
    group = per_brainstorm(settings)
    for kind in ("short-long", "long-short", "short-short", "long-long"):
        assert sum(r["kind"] == kind for r in requests) == -(-counts[kind] // group)
    assert "about 20" in requests[0]["prompt"]
    tasks = {r["key"]: [f"Task {r['key']} number {i} for testing." for i in range(20)] for r in requests}
    items, waiting = expand(settings, slots, tasks)
    assert not waiting and len({i["id"] for i in items}) == 600
    for slot, item in zip(slots, items):
        kind = KINDS[slot.kind]
        for value in slot.values.values():
            assert str(value) in item["prompt"]
        assert LANGUAGE_NAMES[slot.language] in item["prompt"]
        assert item["task"] == (kind.fixed_task or tasks[slot.brainstorm][slot.pick % 20])
        if slot.kind == "bitext":
            assert slot.tgt_language and slot.tgt_language != slot.language and "en" in (slot.language, slot.tgt_language)
    # A group whose brainstorm is missing leaves exactly its slots waiting.
    missing = requests[0]["key"]
    items2, waiting2 = expand(settings, slots, {k: v for k, v in tasks.items() if k != missing})
    assert {s.brainstorm for s in waiting2} == {missing} and len(items2) + len(waiting2) == 600


# ---- parsing and rows ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, reason", [
    ("", "empty_answer"), ("Sure, here you go!", "not_json"), ('{"S1": "a", "S2": ', "truncated_json"),
    ('{"S1": "a" "S2": "b"}', "malformed_json"), ("[1, 2]", "not_an_object"),
])
def test_parse_drops_with_reasons(text, reason):
    with pytest.raises(Dropped) as err:
        validate_answer(parse_json(text), KINDS["sts"], 1, 1000)
    assert err.value.reason == reason


def test_validation_drops_bad_fields_and_maps_rows_per_kind():
    from ray_e5.generate.backends import Completion
    from ray_e5.generate.completions import finish

    for answer, reason in (({"S1": "a", "S2": "b"}, "missing_keys"), ({"S1": "a", "S2": " ", "S3": "c"}, "empty_field"),
                           ({"S1": "a", "S2": ["b"], "S3": "c"}, "wrong_type"),
                           ({"S1": "a", "S2": "b" * 50, "S3": "c"}, "length_out_of_bounds")):
        with pytest.raises(Dropped, match=reason):
            validate_answer(answer, KINDS["sts"], 1, 40)
    assert validate_answer(parse_json('```json\n{"S1": "a", "S2": "b", "S3": "c"}\n```'), KINDS["sts"], 1, 9)["S2"] == "b"
    with pytest.raises(Dropped, match="too_short"):
        validate_answer({"input": "word " * 300, "positive_document": "only a few words"}, KINDS["long-long"], 1, 10**5)

    settings = GenerateSettings(backend="endpoint", base_url="http://x", model="m")
    base = {"id": "i", "task": "Classify things.", "language": "de", "tgt_language": "", "prompt_id": "p"}
    row = finish("example", {**base, "kind": "long-short"}, Completion(json.dumps(
        {"input_text": "Ein Text", "label": "gut", "misleading_label": "schlecht"}), 10, 5), settings)
    assert (row["query"], row["positive"], row["negative"], row["drop"]) == ("Ein Text", "gut", "schlecht", "")
    assert (row["backend"], row["model"], row["prompt_tokens"], row["completion_tokens"]) == ("endpoint", "m", 10, 5)
    row = finish("example", {**base, "kind": "bitext", "tgt_language": "en"}, Completion(json.dumps(
        {"S1": "Hallo Welt", "S2": "Hello world", "S3": "Hi planet"}), 1, 1), settings)
    assert (row["language"], row["query"], row["positive"], row["negative"]) == ("de-en", "Hallo Welt", "Hello world", "Hi planet")
    row = finish("example", {**base, "kind": "sts"}, Completion('{"S1": "a", "S2', 1, 1, "length"), settings)
    assert row["drop"] == "truncated_max_tokens" and row["query"] == ""


# ---- configuration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, key", [
    ({"mix": {"poems": 1}}, "generate.mix"), ({"mix": {"sts": -1}}, "generate.mix"),
    ({"languages": ["en", "xx"]}, "generate.languages"), ({"language_weights": {"qq": 1}}, "generate.language_weights"),
    ({"num_examples": -5}, "generate.num_examples"), ({"concurrency": 0}, "generate.concurrency"),
    ({"backend": "endpoint"}, "generate.base_url"),
    ({"backend": "endpoint", "base_url": "http://x", "model": "my-model", "budget_usd": 5}, "generate.prices"),
    ({"tokens_per_minute": -1}, "generate.tokens_per_minute"), ({"unknown_key": 1}, "generate.unknown_key"),
])
def test_bad_config_is_refused_before_any_request(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RayE5Config.model_validate({"generate": bad}).section("generate", GenerateSettings)


@pytest.mark.parametrize("bad, key", [
    ({"backend": "openai", "api_key_env": "RAY_E5_NO_SUCH_KEY"}, "RAY_E5_NO_SUCH_KEY"),
    ({"backend": "azure", "base_url": "https://x.openai.azure.com"}, "AZURE_OPENAI_API_KEY"),
])
def test_a_hosted_backend_without_its_key_is_refused_when_generation_starts(bad, key, monkeypatch, tmp_path):
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    config = RayE5Config.model_validate({"run_dir": str(tmp_path / "run"), "generate": bad})
    config.section("generate", GenerateSettings)  # the config itself is fine: a train job needs no key
    with pytest.raises(ConfigError, match=key):
        generate(config)
    assert not (tmp_path / "run" / "synthetic").exists() or not list((tmp_path / "run" / "synthetic").iterdir())


def test_config_sections_of_the_shipped_configs_validate(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    quick = load_config(ROOT / "configs" / "quickstart.yaml").section("generate", GenerateSettings)
    assert quick.backend == "llamacpp" and quick.num_examples <= 200 and quick.time_budget_s
    paper = load_config(ROOT / "configs" / "e5-mistral-7b.yaml").section("generate", GenerateSettings)
    assert paper.backend == "openai" and paper.num_examples == 500_000 and paper.price() is not None
    assert paper.mix == {"short-long": 167, "long-short": 122, "sts": 99, "bitext": 89, "long-long": 17, "short-short": 13}


# ---- filters and the ledger ------------------------------------------------------------------------------------
def test_dedup_drops_exact_and_near_duplicates():
    from ray_e5.generate.filters import Deduplicator

    dedup = Deduplicator(0.8)
    base = " ".join(f"token{i}" for i in range(60))
    assert dedup.check({"query": "q", "positive": base}) is None
    assert dedup.check({"query": "Q", "positive": base + " "}) == "duplicate_exact"  # case and spacing ignored
    assert dedup.check({"query": "q", "positive": base + " token61"}) == "duplicate_near"
    assert dedup.check({"query": "q", "positive": " ".join(f"other{i}" for i in range(60))}) is None


def test_contamination_filter_drops_rows_overlapping_eval_sets(tmp_path):
    from ray_e5.generate.filters import ContaminationFilter

    sentence = "the quick brown fox jumps over the lazy dog near the old river bank today at noon"
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "test.jsonl").write_text(json.dumps({"sentence1": sentence, "score": 3.0}) + "\n"
                                                   + json.dumps({"text": "A short title here"}) + "\n")
    f = ContaminationFilter([str(tmp_path / "evals")], 13)
    assert f.check({"query": "x", "positive": "Intro. " + sentence.upper() + " and more.", "negative": ""}) == "contaminated"
    assert f.check({"query": "a  SHORT title, here!", "positive": "y", "negative": ""}) == "contaminated"
    assert f.check({"query": "the quick brown fox", "positive": "a lazy dog by the river", "negative": ""}) is None
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ContaminationFilter([str(tmp_path / "nowhere")], 13)


def test_ledger_spaces_requests_and_never_overshoots_the_budget():
    from ray_e5.generate.ledger import Ledger

    async def run():
        limited = Ledger(requests_per_minute=600)  # 10 per second, about one second of burst
        start = time.monotonic()
        for _ in range(25):
            assert await limited.acquire(10, 10)
        spacing = time.monotonic() - start
        money = Ledger(budget_usd=1.0, price=(1000.0, 1000.0))  # $0.001 a token: worst case 0.2 per request
        granted = [await money.acquire(100, 100) for _ in range(8)]
        for _ in range(sum(granted)):
            await money.settle(100, 100, 50, 50)  # each really cost 0.1
        after = [await money.acquire(100, 100) for _ in range(8)]
        return spacing, granted, after, await money.state()

    spacing, granted, after, state = asyncio.run(run())
    assert spacing >= 1.3  # 25 requests at 10/s with a burst of 10 take at least 1.5 s
    assert granted == [True] * 5 + [False] * 3  # five worst cases fill the budget
    assert state["spent_usd"] == pytest.approx(0.5) and sum(after) == 2  # 0.5 spent leaves room for two more
    assert state["spent_usd"] + state["reserved_usd"] <= 1.0


# ---- vLLM on GPU nodes: the processor config is built here -----------------------------------------------------
def test_vllm_processor_config_and_rows(ray_cluster, tiny_decoder_dir):
    from ray.data.llm import build_processor

    from ray_e5.generate.backends import vllm_completion, vllm_postprocess, vllm_preprocess, vllm_processor_config
    from ray_e5.generate.completions import finish

    settings = GenerateSettings(backend="vllm", temperature=0.7, max_tokens=333, vllm={
        "model": str(tiny_decoder_dir), "concurrency": 3, "tensor_parallel_size": 2, "batch_size": 16})
    config = vllm_processor_config(settings)
    assert (config.model_source, config.concurrency, config.batch_size) == (str(tiny_decoder_dir), 3, 16)
    assert config.engine_kwargs["tensor_parallel_size"] == 2 and config.should_continue_on_error
    processor = build_processor(config, preprocess=vllm_preprocess(settings), postprocess=vllm_postprocess)
    stages = {type(s).__name__: s for s in processor.stages.values()}
    assert list(stages) == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    engine = stages["vLLMEngineStage"]
    assert engine.map_batches_kwargs["compute"].max_size == 3
    assert engine.fn_constructor_kwargs["engine_kwargs"]["tensor_parallel_size"] == 2

    schema = {"type": "object", "properties": {"S1": {"type": "string"}}, "required": ["S1"]}
    row = vllm_preprocess(settings)({"id": "x", "prompt": "Write S1.", "schema": json.dumps(schema), "max_tokens": 333})
    assert row["messages"] == [{"role": "user", "content": "Write S1."}]
    assert row["sampling_params"] == {"temperature": 0.7, "top_p": 1.0, "max_tokens": 333,
                                      "structured_outputs": {"json": json.dumps(schema)}}
    item = {"id": "x", "kind": "sts", "task": "t", "language": "en", "tgt_language": "", "prompt_id": "p"}
    ok = finish("example", item, vllm_completion({**item, "generated_text": '{"S1": "a", "S2": "b", "S3": "c"}',
                                                   "num_input_tokens": 7, "num_generated_tokens": 9}), settings)
    assert (ok["query"], ok["completion_tokens"], ok["model"], ok["drop"]) == ("a", 9, str(tiny_decoder_dir), "")
    failed = finish("example", item, vllm_completion({**item, "__inference_error__": "CUDA OOM"}), settings)
    assert failed["drop"] == "request_engine_error"


# ---- the pipeline against the fault-injecting server -----------------------------------------------------------
def test_faults_are_dropped_and_counted_and_no_valid_row_is_lost(ray_cluster, tmp_path):
    faults = ["ok", "ok", *FAULTS, "ok", "bad_body", "cut", "ok"]
    with TestServer(faults=faults, hang_s=3, retry_after_s=0.05) as server:
        manifest = generate(_config(tmp_path, server.base_url, num_examples=30, request_timeout_s=1.0,
                                    mix={"short-long": 1, "sts": 1, "long-short": 1})).manifest
        calls = list(server.calls)
    rows = _rows(tmp_path)
    assert manifest["examples"] == len(rows) == len({r["id"] for r in rows}) > 0
    for row in rows:
        assert row["query"] and row["positive"] and row["negative"] and row["backend"] == "endpoint"
        assert row["task"] and row["kind"] in KINDS and row["prompt_id"].startswith(row["kind"])
    drops = manifest["drops_this_run"]
    modes = Counter(c.mode for c in _example_calls(calls))
    # Every answer the server sent is accounted for: content faults are dropped under their own names ...
    expected = {"missing_keys": modes["wrong_keys"], "empty_field": modes["empty"], "not_json": modes["prose"],
                "truncated_json": modes["truncated"], "malformed_json": modes["malformed"],
                "request_bad_response": modes["bad_body"], "truncated_max_tokens": modes["cut"]}
    assert {k: drops.get(k, 0) for k in expected} == expected and sum(expected.values()) > 0
    # ... 429/500/timeouts were retried by the openai client (only a timeout on every try drops a row) ...
    assert modes["429"] and modes["500"] and modes["timeout"]
    assert set(drops) <= set(expected) | {"request_timeout", "request_http_429", "request_http_500"}
    # ... and every good answer became a row.
    assert manifest["examples"] == modes["ok"]
    assert manifest["examples"] + sum(drops.values()) == 30 == manifest["requests_this_run"]
    assert manifest["tokens"]["prompt"] > 0 and manifest["brainstorm"]["groups"] == 2


def test_kill_and_resume_writes_no_duplicate_and_never_pays_twice(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    # A generous client timeout: a call that times out while the server is still answering is retried, and the
    # server then answers it twice (a real double charge that only a longer timeout avoids), which a loaded
    # 2-core machine would otherwise provoke here.
    with TestServer(latency_s=0.15, slots=2) as server:
        config = _config(tmp_path, server.base_url, num_examples=40, concurrency=2, shard_size=3,
                         flush_every_s=0.5, mix={"short-short": 1, "sts": 1}, request_timeout_s=60.0)
        proc = generation_driver(config, address)
        out = tmp_path / "run" / "synthetic"
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.parquet"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, as with a preempted node
        proc.wait()
        # Ray reaps the dead job's actors on its own time; until then one of them may still journal an answer
        # that arrived before the kill. Wait for them to be gone (on a loaded machine that takes seconds), as a
        # rerun after a real preemption would find them.
        import psutil

        gone_by = time.monotonic() + 90
        while time.monotonic() < gone_by and any(
                "ChatCompleter" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
            time.sleep(0.5)
        settled = len(server.calls)  # let the dead driver's actors be reaped before counting the rerun's calls
        while True:
            time.sleep(1.5)
            if len(server.calls) == settled:
                break
            settled = len(server.calls)
        first = _rows(tmp_path)
        assert 0 < len(first) < 40, "the run was not caught mid-way"
        assert (out / "brainstorm.json").exists()
        calls_before = len(server.calls)
        manifest = generate(config).manifest
        calls = list(server.calls)
        rerun = calls[calls_before:]
    rows = _rows(tmp_path)
    assert len(rows) == len({r["id"] for r in rows}) == manifest["examples"] == 40  # every slot exactly once
    answered = [c for c in calls if c.answered]
    assert all(c.request_id for c in answered) and len({c.request_id for c in answered}) > 40  # 40 + the brainstorm
    # The one double charge no client can avoid: an answer already on the wire when its actor died was billed but
    # never reached the journal, so the rerun asks it once more (a hosted API bills such a request too). Only
    # requests in flight at the actors' death can be such, so there are at most actors x concurrency of them, each
    # answered once in the killed run and once in the rerun.
    seen = Counter(c.request_id for c in answered)
    twice = {i for i, n in seen.items() if n > 1}
    settings = GenerateSettings.model_validate(config.generate)
    in_flight = settings.actors * settings.concurrency
    assert len(twice) <= in_flight and all(seen[i] == 2 for i in twice)
    lost = [c for c in calls[:calls_before] if c.answered and c.request_id in twice]
    assert len(lost) == len(twice) and twice <= {c.request_id for c in rerun if c.answered}
    assert {r["id"] for r in first}.isdisjoint(c.request_id for c in rerun)  # nothing written was asked again
    assert not any(c.prompt.startswith(BRAINSTORM_OPENING) for c in rerun)  # the brainstorm was reused
    assert 0 < len(rerun) <= 40 - len(first)  # answers journaled but not yet written were not bought again
    # Every token the server billed and the journal received, over both runs, is in the manifest; and none twice.
    kept = [c for c in calls[:calls_before] if c.answered and c.request_id not in twice] + \
        [c for c in rerun if c.answered]
    assert manifest["tokens"] == {"prompt": sum(c.prompt_tokens for c in kept),
                                  "completion": sum(c.completion_tokens for c in kept)}
    assert manifest["runs"] == 2 and manifest["drops"] == {}


def test_an_actor_killed_mid_batch_is_restarted_and_pays_for_nothing_twice(ray_cluster, tmp_path):
    import threading

    import psutil

    out = tmp_path / "run" / "synthetic"
    killed: list[int] = []

    def kill_an_actor_once_it_answered():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            journal = list((out / "journal").glob("*.jsonl")) if (out / "journal").exists() else []
            if sum(len(f.read_text().splitlines()) for f in journal) >= 3:
                for proc in psutil.process_iter(["cmdline"]):
                    if "ChatCompleter" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()
                        killed.append(proc.pid)
                        return
            time.sleep(0.05)

    with TestServer(latency_s=0.3, slots=4) as server:
        killer = threading.Thread(target=kill_an_actor_once_it_answered, daemon=True)
        killer.start()
        manifest = generate(_config(tmp_path, server.base_url, num_examples=24, mix={"sts": 1}, concurrency=4,
                                    request_timeout_s=60.0)).manifest
        killer.join(5)
        calls = list(server.calls)
    assert killed, "no generation actor was caught mid-run"
    rows = _rows(tmp_path)
    assert manifest["examples"] == len(rows) == len({r["id"] for r in rows}) == 24  # every slot, once
    answered = [c.request_id for c in calls if c.answered]
    assert len(answered) == len(set(answered)) == 24  # the retried batch was not paid for again


def test_time_budget_stops_cleanly(ray_cluster, tmp_path):
    with TestServer(latency_s=0.5, slots=1) as server:  # 60 requests need 30 s; the budget is 15 s
        manifest = generate(_config(tmp_path, server.base_url, mix={"sts": 1}, num_examples=60, time_budget_s=15,
                                    concurrency=2)).manifest
    assert 0 < manifest["examples"] < 60 and len(_rows(tmp_path)) == manifest["examples"]
    assert manifest["drops_this_run"] == {"skipped_time_budget": 60 - manifest["examples"]}
    assert manifest["wall_seconds_this_run"] < 15 + 10  # stopped at the budget, not after the 30 s of work


def test_budget_cap_and_rate_limit_hold_across_resumes(ray_cluster, tmp_path):
    # $1000 per 1M tokens: each request's worst case is about $0.35, its real cost about $0.15.
    kw = dict(mix={"sts": 1}, num_examples=30, max_tokens=100, prices={"test-model": [1000, 1000]}, budget_usd=2.0,
              requests_per_minute=240, concurrency=4)
    with TestServer() as server:
        manifest = generate(_config(tmp_path, server.base_url, **kw)).manifest
        first_calls = list(server.calls)
        again = generate(_config(tmp_path, server.base_url, **kw)).manifest
        second_calls = server.calls[len(first_calls):]
    assert 0 < manifest["examples"] < 30 and manifest["drops_this_run"]["skipped_budget"] == 30 - manifest["examples"]
    assert manifest["cost_usd"] <= 2.0 and len(first_calls) == manifest["examples"]
    assert again["cost_usd"] <= 2.0 and len(second_calls) + len(first_calls) == again["examples"]
    # 4 requests per second after about one second of burst (4 calls); the first call's arrival may lag its
    # permit on a loaded machine, so one more call is allowed for that jitter
    span = first_calls[-1].at - first_calls[0].at
    assert span >= (len(first_calls) - 5) / 4 * 0.9, (span, len(first_calls))


def test_hosted_backend_through_the_cli_keeps_the_key_out_of_everything(ray_cluster, tmp_path):
    secret = "sk-ray-e5-test-3b1f9c0d7e"
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "OPENAI_API_KEY": secret}
    with TestServer(faults=["ok", "prose", "429", "ok"]) as server:
        proc = subprocess.run(
            [sys.executable, "-m", "ray_e5.cli", "generate", "--address", address, "--num-examples", "6",
             "--set", f"run_dir={tmp_path / 'run'}", "--set", "generate.backend=openai", "--set", "generate.model=gpt-4o-mini",
             "--set", f"generate.base_url={server.base_url}", "--set", "generate.mix={sts: 1, short-short: 1}",
             "--set", "generate.progress=false"], env=env, capture_output=True, text=True, timeout=300)
        auth = {c.authorization for c in server.calls}
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert auth == {f"Bearer {secret}"}  # the key reached the server (read on the driver, not from the workers' env)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["examples"] >= 1 and summary["cost_usd"] > 0
    assert secret not in proc.stdout + proc.stderr
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    session = Path(ray_cluster._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in session.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path


def test_a_refused_key_stops_with_a_clear_error_that_does_not_show_it(ray_cluster, tmp_path, monkeypatch):
    from ray_e5.generate.run import GenerateError

    secret = "sk-ray-e5-refused-8842"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with TestServer(faults=["401"]) as server:
        with pytest.raises(GenerateError) as err:
            generate(_config(tmp_path, server.base_url, backend="openai", model="gpt-4o", mix={"short-long": 1}))
        assert len(server.calls) <= 2  # the brainstorm request (and no retry of a 401) told us; no example was sent
    message = str(err.value)
    assert "401" in message and "OPENAI_API_KEY" in message and secret not in message
    assert not _rows(tmp_path)


def test_a_backend_whose_first_requests_all_fail_stops_the_stage_naming_it(ray_cluster, tmp_path):
    from ray_e5.generate.errors import BackendError

    with TestServer(faults=["500"]) as server:
        with pytest.raises(BackendError) as err:
            generate(_config(tmp_path, server.base_url, num_examples=40, mix={"sts": 1}, max_retries=1))
        sent = {c.request_id for c in server.calls}
    message = str(err.value)
    assert server.base_url in message and "request_http_500" in message, message
    assert 8 <= len(sent) < 40  # it stopped after the first requests, not after all 40
    assert not _rows(tmp_path)


@pytest.mark.slow
def test_end_to_end_llama_cpp_gemma(ray_cluster, tmp_path):
    kinds = {"sts": 1, "long-short": 1}  # the two kinds the 270M writer gets right most often (half and more)
    config = RayE5Config.model_validate({"run_dir": str(tmp_path / "run"), "generate": {
        "backend": "llamacpp", "num_examples": 16, "mix": kinds, "languages": ["en"], "max_tokens": 128,
        "brainstorm_max_tokens": 200, "temperature": 0.8, "concurrency": 2, "progress": False}})
    manifest = generate(config).manifest
    assert manifest["tokens"]["completion"] > 0 and manifest["model"] == "gemma3-270m"
    assert "AVX2 = 1" in manifest["llamacpp_system_info"]
    rows = _rows(tmp_path)
    assert len(rows) == manifest["examples"]
    by_kind = Counter(r["kind"] for r in rows)
    assert all(by_kind[k] >= 1 for k in kinds), (by_kind, manifest["drops_this_run"])  # a valid row of each kind
    for row in rows:
        assert row["query"].strip() and row["positive"].strip() and row["backend"] == "llamacpp"
        assert row["query"].strip().lower() != row["positive"].strip().lower() and row["completion_tokens"] > 0
    assert (tmp_path / "run" / "synthetic" / "llamacpp.log").stat().st_size > 0  # the server's log is kept


def test_the_llama_cpp_build_claims_no_feature_it_was_not_asked_for():
    from ray_e5.generate.llamacpp import PORTABLE_FEATURES, claimed_features, cpu_flags, system_info, unsupported

    info = system_info()
    claimed = claimed_features(info)
    assert {"AVX2", "FMA", "F16C"} <= claimed, info  # the SIMD the portable build asks for is there ...
    assert claimed <= PORTABLE_FEATURES, info  # ... and nothing else (no AVX-512, no AMX): it runs on any x86-64-v3
    assert unsupported(claimed) == [], (info, sorted(cpu_flags())[:50])


def test_a_build_for_another_cpu_is_refused_before_the_server_starts():
    from ray_e5.generate.errors import BackendError
    from ray_e5.generate.llamacpp import check_build, claimed_features, unsupported

    amx = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 |"
    assert claimed_features(amx) == {"SSE3", "AVX2", "AVX512", "AMX_INT8"}
    # A VM that advertises AMX (and AVX-512) in CPUID but does not enable the tile state:
    assert unsupported(claimed_features(amx), {"pni", "avx2", "avx512f", "amx_int8"}, amx=False) == ["AMX_INT8"]
    assert unsupported(claimed_features(amx), {"pni", "avx2"}, amx=True) == ["AMX_INT8", "AVX512"]
    if unsupported(claimed_features(amx)):  # this machine lacks one of them: the real check refuses the build
        with pytest.raises(BackendError, match=r"compiled for another CPU.*CMAKE_ARGS=.*GGML_NATIVE=OFF"):
            check_build(amx)


@pytest.mark.slow
def test_a_llama_cpp_server_that_dies_mid_run_stops_the_stage_with_its_signal(ray_cluster, tmp_path):
    import threading

    from ray_e5.generate.errors import BackendError

    config = RayE5Config.model_validate({"run_dir": str(tmp_path / "run"), "generate": {
        "backend": "llamacpp", "num_examples": 40, "mix": {"sts": 1}, "languages": ["en"], "max_tokens": 96,
        "concurrency": 2, "progress": False, "flush_every_s": 1, "shard_size": 1}})
    out = tmp_path / "run" / "synthetic"
    killed_at: list[float] = []

    def kill_when_answering():  # SIGKILL the server once it has answered a few requests, as a crash would
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            journal = list((out / "journal").glob("*.jsonl")) if (out / "journal").exists() else []
            if sum(len(f.read_text().splitlines()) for f in journal) >= 3:
                import psutil

                for proc in psutil.process_iter(["cmdline"]):
                    if "llama_cpp.server" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()
                        killed_at.append(time.monotonic())
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_answering, daemon=True)
    killer.start()
    with pytest.raises(BackendError) as err:
        generate(config)
    stopped = time.monotonic()
    message = str(err.value)
    assert killed_at and stopped - killed_at[0] < 10, "the stage did not stop within seconds of the crash"
    assert "llama.cpp server" in message and "SIGKILL" in message and "llamacpp.log" in message, message
    rows = _rows(tmp_path)
    for row in rows:  # what was written before the crash stays valid
        assert row["kind"] == "sts" and row["query"] and row["positive"]
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    assert manifest.get("examples", 0) == len(rows)
    print(f"server killed; the stage stopped {stopped - killed_at[0]:.1f} s later: {message.splitlines()[0]}")
