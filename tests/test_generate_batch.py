"""Generation through the OpenAI Batch API (``generate.batch_api``) against the test server's /v1/files and
/v1/batches, with the real openai client: the same rows as the synchronous path, parts under the limits, a SIGKILL
while polling and a resume that submits no line twice (from the server's own log), failed and expired lines
resubmitted once, the budget refusing lines before they are uploaded, a refused upload, and ``--status``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from ray_e5.config import ConfigError, RayE5Config
from ray_e5.generate.config import GenerateSettings
from ray_e5.generate.errors import EmptySyntheticError, GenerateError
from ray_e5.generate.run import generate
from ray_e5.testing.generate import generation_driver
from ray_e5.testing.openai_server import TestServer

FIELDS = ("id", "kind", "task", "language", "query", "positive", "negative", "prompt_id", "prompt_tokens",
          "completion_tokens")


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-batch-test")


def _config(tmp_path, base_url, name="run", **generate_kw) -> RayE5Config:
    gen = {"backend": "openai", "base_url": base_url, "model": "gpt-4o-mini", "num_examples": 24, "max_retries": 2,
           "request_timeout_s": 10.0, "concurrency": 4, "progress": False, "batch_api": True, "batch_poll_s": 0.02,
           "batch_poll_max_s": 0.1, "mix": {"sts": 1, "bitext": 1}, **generate_kw}
    return RayE5Config.model_validate({"run_dir": str(tmp_path / name), "generate": gen})


def _rows(tmp_path, name="run") -> list[dict]:
    shards = sorted((tmp_path / name / "synthetic").glob("*.parquet"))
    return [row for shard in shards for row in pq.read_table(str(shard)).to_pylist()]


def _uploads(server) -> list[dict]:
    return [f for f in server.files.values() if f["purpose"] == "batch"]


def _registry(tmp_path, name="run") -> list[dict]:
    path = tmp_path / name / "synthetic" / "batches.json"
    return json.loads(path.read_text())["parts"] if path.exists() else []


def test_batch_settings_are_checked_at_load():
    for bad, key in (({"backend": "endpoint", "base_url": "http://x"}, "batch_api"),
                     ({"backend": "openai", "time_budget_s": 60}, "time_budget_s"),
                     ({"backend": "openai", "prompt_style": "completion"}, "prompt_style"),
                     ({"backend": "openai", "batch_max_requests": 50_001}, "batch_max_requests"),
                     ({"backend": "openai", "batch_max_bytes": 0}, "batch_max_bytes")):
        with pytest.raises(ConfigError, match=key):
            RayE5Config.model_validate({"generate": {"batch_api": True, **bad}}).section("generate", GenerateSettings)
    s = GenerateSettings(backend="openai", model="gpt-4o-mini", batch_api=True)
    assert s.cost_usd(1_000_000, 1_000_000) == pytest.approx((0.15 + 0.6) * 0.5)  # the Batch API's half price
    assert s.model_copy(update={"batch_api": False}).cost_usd(1_000_000, 1_000_000) == pytest.approx(0.75)


def test_batch_rows_equal_the_synchronous_rows_in_parts_under_the_limits(ray_cluster, tmp_path):
    limits = {"batch_max_requests": 5, "batch_max_bytes": 5000}
    mix = {"short-short": 1, "sts": 1}  # a brainstorm phase, then examples
    with TestServer(deterministic=True, batch_polls=2) as server:
        sync = generate(_config(tmp_path, server.base_url, "sync", mix=mix, batch_api=False)).manifest
        sync_calls = len(server.calls)
        batch = generate(_config(tmp_path, server.base_url, "batch", mix=mix, **limits)).manifest
        lines = list(server.batch_lines)
        uploads = _uploads(server)
        parts = _registry(tmp_path, "batch")
        contents = [server.app.state.files[f["id"]]["data"] for f in uploads]
        batch_calls = server.calls[sync_calls:]
    want = {r["id"]: {k: r[k] for k in FIELDS} for r in _rows(tmp_path, "sync")}
    got = {r["id"]: {k: r[k] for k in FIELDS} for r in _rows(tmp_path, "batch")}
    assert want and got == want  # the same ids, the same parsed fields, the same tokens
    assert batch["examples"] == sync["examples"] == len(want) and batch["drops"] == sync["drops"]
    assert batch["tokens"] == sync["tokens"] and sync["tokens"]["prompt"] > 0
    assert batch["cost_usd"] == pytest.approx(sync["cost_usd"] * 0.5, abs=2e-6)  # the batch discount (6 decimals)
    # Every planned request went in exactly one line, every line of every file under both limits.
    ids = [rid for _, rid in lines]
    assert len(ids) == len(set(ids)) == 24 + batch["brainstorm"]["groups"]
    assert {c.request_id for c in batch_calls if c.answered} == set(ids)
    assert len(uploads) == len(parts) >= 24 / 5
    for data in contents:
        assert len(data) <= 5000 and 1 <= len(data.splitlines()) <= 5
    assert all(p["status"] == "completed" and p["batch_id"] and p["collected_at"] for p in parts)
    assert {p["phase"] for p in parts} == {"brainstorm", "example"}


def test_sigkill_while_polling_then_resume_submits_no_line_twice(ray_cluster, tmp_path, capsys):
    from ray_e5.generate.batch_api import status

    address = ray_cluster.get_runtime_context().gcs_address
    with TestServer(deterministic=True, batch_polls=10**6) as server:  # batches stay in flight until we say so
        config = _config(tmp_path, server.base_url, num_examples=30, batch_max_requests=8, batch_poll_s=0.1)
        proc = generation_driver(config, address)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # kill once every part has been polled
            parts = _registry(tmp_path)
            if sum(p["requests"] for p in parts) == 30 and all(
                    server.app.state.batches.get(p.get("batch_id"), {}).get("polls", 0) >= 2 for p in parts):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies while its batches are in flight
        proc.wait()
        before = _registry(tmp_path)
        batches_before, lines_before = len(server.batches), len(server.batch_lines)
        assert [p["status"] for p in before] == ["in_progress"] * 4, before
        assert not _rows(tmp_path)
        capsys.readouterr()
        status(config)  # --status: reads the API, submits nothing
        printed = capsys.readouterr().out
        in_flight = [line for line in printed.splitlines() if line.startswith("example-") and "in_progress" in line]
        assert len(server.batches) == batches_before and len(in_flight) == 4
        for part in before:
            assert part["batch_id"] in printed
        server.app.state.batch_polls = 2
        manifest = generate(config).manifest  # the rerun re-attaches
        lines = list(server.batch_lines)
        answered = [c.request_id for c in server.calls if c.answered]
    rows = _rows(tmp_path)
    assert manifest["examples"] == len(rows) == len({r["id"] for r in rows}) == 30
    assert len(lines) == lines_before == 30  # no line submitted again
    assert len({rid for _, rid in lines}) == 30 and len(answered) == len(set(answered)) == 30
    assert len(server.batches) == batches_before
    assert manifest["tokens"]["completion"] == sum(c.completion_tokens for c in server.calls if c.answered)


def test_a_driver_killed_between_upload_and_batch_id_finds_its_batch(tmp_path):
    from ray_e5.generate.batch_api import BatchPhase
    from ray_e5.generate.plan import expand, plan_slots

    with TestServer(batch_polls=10**6) as server:
        settings = _config(tmp_path, server.base_url, num_examples=10, batch_max_requests=4).section(
            "generate", GenerateSettings)
        items, _ = expand(settings, plan_slots(settings), {})
        out = str(tmp_path / "run" / "synthetic")
        assert list(BatchPhase(settings, out, "example")._submit(items, 0)) == []  # every part submitted ...
        registry = tmp_path / "run" / "synthetic" / "batches.json"
        parts = json.loads(registry.read_text())["parts"]
        assert len(parts) == 3 and all(p["status"] == "validating" for p in parts)
        for part in parts[1:]:  # ... then two batch ids forgotten, as a kill right after batches.create does
            part.update(status="uploaded", batch_id=None)
        registry.write_text(json.dumps({"parts": parts}))
        server.app.state.batch_polls = 1
        rows = list(BatchPhase(settings, out, "example").rows(items))
        # A driver killed while collecting (its journal short of these answers) downloads them again.
        again = list(BatchPhase(settings, out, "example").rows(items[:7]))
        lines = [rid for _, rid in server.batch_lines]
    assert len(server.batches) == 3 and len(lines) == len(set(lines)) == 10  # found again, not resubmitted
    assert sorted(r["id"] for r in rows if not r["drop"]) == sorted(i["id"] for i in items)
    assert sorted(r["id"] for r in again if not r["drop"]) == sorted(i["id"] for i in items[:7])
    assert [r for r in again if r["id"] == items[0]["id"]] == [r for r in rows if r["id"] == items[0]["id"]]


@pytest.mark.parametrize("faults, parts", [
    (["expire", "fail", "errors", "malformed"] + ["complete"] * 4, 4),  # each resubmission completes
    (["expire"], 1),  # the resubmission expires too: left for a rerun
])
def test_failed_expired_and_error_lines_are_resubmitted_once(ray_cluster, tmp_path, faults, parts):
    with TestServer(batch_faults=faults, batch_polls=1) as server:
        manifest = generate(_config(tmp_path, server.base_url, batch_max_requests=24 // parts)).manifest
        lines = list(server.batch_lines)
        results = {b: server.batch_results(b) for b in server.batches}
        status = {b: v["status"] for b, v in server.batches.items()}
    per_id = Counter(rid for _, rid in lines)
    first: dict[str, str] = {}
    for batch_id, rid in lines:
        first.setdefault(rid, batch_id)
    # What the server did not run (a failed batch, expired lines) or answered with a 500 went out once more ...
    not_run = {rid for rid, b in first.items() if status[b] == "failed" or rid in results[b][1]}
    assert not_run and {rid for rid, n in per_id.items() if n == 2} == not_run
    assert max(per_id.values()) == 2 and len(per_id) == 24  # ... once, and nothing else twice
    answered = [rid for b in results for rid in results[b][0] if rid]
    assert len(answered) == len(set(answered))  # never an answered line again
    malformed = sum(ids.count(None) for ids, _ in results.values())
    left = sum(1 for rid, n in per_id.items() if n == 2 and rid not in answered)
    assert manifest["examples"] == len(answered)
    drops = manifest["drops_this_run"]
    assert drops.get("request_bad_response", 0) == malformed and drops.get("skipped_batch_expired", 0) == left
    assert manifest["examples"] + malformed + left == 24
    if faults == ["expire"]:
        assert left == 6 and manifest["examples"] == 18  # 12 + 6 of the 12 resubmitted, the last 6 for a rerun


def test_budget_refuses_lines_before_they_are_uploaded(ray_cluster, tmp_path):
    from ray_e5.generate.batch_api import worst_cost
    from ray_e5.generate.plan import expand, plan_slots

    kw = dict(model="test-model", prices={"test-model": [1000, 1000]}, max_tokens=100, mix={"sts": 1})
    with TestServer() as server:
        with pytest.raises(EmptySyntheticError):  # even one line's worst case is over: nothing is uploaded
            generate(_config(tmp_path, server.base_url, "none", budget_usd=0.01, **kw))
        assert not _uploads(server) and not server.batch_lines
        config = _config(tmp_path, server.base_url, budget_usd=2.0, **kw)
        manifest = generate(config).manifest
        sent = {rid for _, rid in server.batch_lines}
    settings = config.section("generate", GenerateSettings)
    items, _ = expand(settings, plan_slots(settings), {})
    cost = {i["id"]: worst_cost(i, settings) for i in items}
    reserved = sum(cost[i] for i in sent)
    refused = set(cost) - sent
    assert sent and refused and reserved <= 2.0  # worst cases at half price fit the budget ...
    assert all(reserved + cost[i] > 2.0 for i in refused)  # ... and no refused line would have fitted
    assert manifest["drops_this_run"] == {"skipped_budget": len(refused)}
    assert 0 < manifest["cost_usd"] <= reserved and manifest["examples"] == len(sent)
    assert manifest["cost_usd"] == pytest.approx(settings.model_copy(update={"batch_api": False}).cost_usd(
        manifest["tokens"]["prompt"], manifest["tokens"]["completion"]) / 2)


def test_an_upload_refused_for_size_says_which_setting_and_loses_nothing(ray_cluster, tmp_path):
    with TestServer(max_file_bytes=6000) as server:
        with pytest.raises(GenerateError, match=r"HTTP 413.*batch_max_bytes") as err:
            generate(_config(tmp_path, server.base_url, num_examples=12))
        assert "sk-batch-test" not in str(err.value)
        assert [p["status"] for p in _registry(tmp_path)] == ["refused"] and not server.batch_lines
        manifest = generate(_config(tmp_path, server.base_url, num_examples=12, batch_max_bytes=6000)).manifest
        sizes = [f["bytes"] for f in _uploads(server)]
    assert manifest["examples"] == 12 and len(sizes) >= 2 and max(sizes) <= 6000


def test_status_command_prints_batches_and_submits_nothing(ray_cluster, tmp_path):
    with TestServer(batch_polls=1) as server:
        generate(_config(tmp_path, server.base_url, num_examples=8, batch_max_requests=4))
        config_file = tmp_path / "gen.yaml"
        config_file.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "generate": _config(
            tmp_path, server.base_url).generate.model_dump(mode="json", exclude_unset=True)}))
        before = (len(server.batches), len(server.files), len(server.batch_lines))
        proc = subprocess.run([sys.executable, "-m", "ray_e5.cli", "generate", "--status", "--config",
                               str(config_file)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OPENAI_API_KEY": "sk-batch-test"})
        after = (len(server.batches), len(server.files), len(server.batch_lines))
        ids = list(server.batches)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert before == after and len(ids) == 2
    for batch_id in ids:
        assert batch_id in proc.stdout
    assert proc.stdout.count("completed") >= 2 and "from the API" in proc.stdout
    assert "sk-batch-test" not in proc.stdout + proc.stderr
    empty = subprocess.run([sys.executable, "-m", "ray_e5.cli", "generate", "--status", "--set",
                            f"run_dir={tmp_path / 'other'}"], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 0 and "no Batch API batches" in empty.stdout


def test_a_part_never_uploaded_is_submitted_once_and_a_bad_registry_is_refused(tmp_path):
    from ray_e5.generate.batch_api import BatchPhase
    from ray_e5.generate.plan import expand, plan_slots

    out = tmp_path / "run" / "synthetic"
    with TestServer(batch_polls=1) as server:
        settings = _config(tmp_path, server.base_url, num_examples=10).section("generate", GenerateSettings)
        items, _ = expand(settings, plan_slots(settings), {})
        (out / "batches").mkdir(parents=True)  # a driver killed during its first upload left this
        (out / "batches" / "example-00000.ids").write_text("\n".join(i["id"] for i in items[:3]) + "\n")
        (out / "batches.json").write_text(json.dumps({"parts": [{"name": "example-00000", "phase": "example",
                                                                 "status": "prepared", "requests": 3}]}))
        rows = list(BatchPhase(settings, str(out), "example").rows(items))
        lines = [rid for _, rid in server.batch_lines]
        parts = json.loads((out / "batches.json").read_text())["parts"]
        (out / "batches.json").write_text('{"parts": [{"name": "x"')  # torn by hand
        with pytest.raises(GenerateError, match="batches.json is not a batch registry"):
            list(BatchPhase(settings, str(out), "example").rows(items))
    assert len(lines) == len(set(lines)) == 10 and sum(not r["drop"] for r in rows) == 10
    assert [p["status"] for p in parts] == ["abandoned", "completed"]


def test_a_brainstorm_batch_that_fails_twice_leaves_its_examples_for_a_rerun(ray_cluster, tmp_path):
    with TestServer(batch_faults=["fail"], batch_polls=1) as server:
        with pytest.raises(EmptySyntheticError) as err:
            generate(_config(tmp_path, server.base_url, mix={"short-short": 1}))
        lines = [rid for _, rid in server.batch_lines]
        manifest = err.value.manifest
        assert len(lines) == 2 and len(set(lines)) == 1  # the brainstorm line, resubmitted once
        assert manifest["brainstorm"]["drops_this_run"] == {"skipped_batch_failed": 1}
        assert manifest["drops_this_run"] == {"skipped_batch_failed": 24}  # waiting on it, named for why
    with TestServer(batch_polls=1) as server:  # the provider is back: the rerun sends what never ran
        manifest = generate(_config(tmp_path, server.base_url, mix={"short-short": 1})).manifest
        again = [rid for _, rid in server.batch_lines]
    assert manifest["examples"] == 24 and again.count(lines[0]) == 1 and len(again) == len(set(again)) == 25


def test_azure_batch_api_through_the_azure_client(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-batch-test")
    with TestServer(batch_polls=1) as server:
        root = server.base_url.rsplit("/v1", 1)[0]  # Azure's resource endpoint; the client adds /openai/...
        manifest = generate(_config(tmp_path, root, backend="azure", model="my-gpt-4o-mini-batch", num_examples=8,
                                    prices={"my-gpt-4o-mini-batch": [0.15, 0.6]})).manifest
        endpoints = {b["endpoint"] for b in server.batches.values()}
        auth = {c.authorization for c in server.calls}
    assert manifest["examples"] == 8 and endpoints == {"/chat/completions"} and manifest["cost_usd"] > 0
    assert auth == {""}  # Azure sends its key in the api-key header, not as a bearer token
