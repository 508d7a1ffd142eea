"""No LLM answer can stop the generate stage: whatever its bytes, envelope or usage counts, an answer becomes a row
that JSON Lines and Parquet hold, or a drop reason the manifest counts. Checked on the path the actors run
(envelope -> parse -> validate -> journal -> Parquet -> token counting), with arbitrary answers (hypothesis), with
each known way to break a parser, on Batch API output files, and end to end through ``ray-e5 generate`` against
the test server answering hostile content."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ray_e5.generate.backends import Completion, MAX_TOKEN_COUNT
from ray_e5.generate.batch_api import BatchPhase, completion_of, make_client
from ray_e5.generate.completions import UNEXPECTED, estimate_tokens, finish
from ray_e5.generate.config import GenerateSettings
from ray_e5.generate.journal import JournalState, JournalWriter, read_journal
from ray_e5.generate.parse import Dropped, parse_tasks, text_problem
from ray_e5.generate.store import COLUMNS, Store, Tally
from ray_e5.testing.openai_server import HOSTILE, TestServer

SETTINGS = GenerateSettings(backend="openai", model="gpt-4o-mini")
ITEM = {"id": "req-0", "kind": "sts", "task": "Retrieve semantically similar text.", "language": "en",
        "prompt_id": "sts-0", "prompt": "Write three sentences. " * 20, "max_tokens": 300}
GOOD = {"S1": "A cat sleeps on the warm mat.", "S2": "Stock markets fell sharply on Monday.",
        "S3": "The recipe needs two cups of flour."}
TEXT_COLUMNS = ("query", "positive", "negative")


def _outcome(record: dict) -> Completion | Dropped:
    """A chat completion body (as a Batch API output line carries it) read the way the actors read one."""
    return completion_of({"custom_id": ITEM["id"], "response": {"status_code": 200, "body": record}})


def _through_the_pipeline(bodies: list, out_dir: str) -> tuple[list[dict], Counter]:
    """Each body as the actors and the driver handle an answer: envelope, parse and validate (finish), the
    journal (written and read back), a Parquet shard of the valid rows (written and read back), token counting.
    Returns the valid rows as read from Parquet and the drops by reason."""
    journal = JournalWriter(out_dir)
    rows = []
    for i, body in enumerate(bodies):
        item = {**ITEM, "id": f"req-{i}"}
        row = finish("example", item, _outcome(body), SETTINGS)
        rows.append(row)
        journal.append({**row, "phase": "example"})
    journal.close()
    back = {r["id"]: r for r in read_journal(out_dir)}
    assert len(back) == len(rows)
    state, tally = JournalState(), Tally()
    drops: Counter = Counter()
    for row in rows:
        assert back[row["id"]] == {**row, "phase": "example"}  # the journal holds the row as it was
        state.note(back[row["id"]])
        tally.add_tokens(row)
        assert isinstance(row["drop"], str) and row["drop"] != UNEXPECTED
        for key in ("prompt_tokens", "completion_tokens"):
            assert type(row[key]) is int and 0 <= row[key] < MAX_TOKEN_COUNT
        if row["drop"]:
            drops[row["drop"]] += 1
            assert all(row[k] == "" for k in TEXT_COLUMNS)
        else:
            assert row["query"] and row["positive"] and not any(text_problem(row[k]) for k in TEXT_COLUMNS)
    assert state.prompt_tokens == tally.prompt_tokens == sum(r["prompt_tokens"] for r in rows)
    assert math.isfinite(SETTINGS.cost_usd(tally.prompt_tokens, tally.completion_tokens))
    valid = [r for r in rows if not r["drop"]]
    read = []
    if valid:
        store = Store(out_dir)
        store.write_shard(valid)
        read = list(store.scan(COLUMNS))
        assert read == [{k: r[k] for k in COLUMNS} for r in valid]  # round trip through the Parquet file
    assert len(read) + sum(drops.values()) == len(bodies)
    return read, drops


# ---- arbitrary answers ------------------------------------------------------------------------------------------
_any_char = st.characters(exclude_categories=())  # surrogates included
_texts = st.one_of(
    st.text(_any_char, max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(["\ud800", "\udcff", "\x00", "\x1b[31m", "\ufeff", "\u202e"]),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_texts, children, max_size=4), max_leaves=12)
# Text of an answer's JSON that Python's parser must not be trusted with, spliced in where a value belongs.
_literals = st.sampled_from(["[" * 50_000 + "]" * 50_000, "9" * 5000, "-" + "1" * 4400, "NaN", "-Infinity",
                             "1e999", '"' + "x" * 400_000 + '"', '"\\ud800"', '"\\u0000"', '"\\uDFFF tail"'])
# A sentence, plain or with something odd in it: most answers must be able to pass.
_sentences = st.builds(lambda n, extra: f"Sentence number {n} about the weather {extra}",
                       st.integers(0, 10 ** 6), st.one_of(st.text("abcdefgh .,", max_size=12), _texts))


def _mostly(good, bad):
    """``good`` three times in four, else ``bad`` (hypothesis leans to small numbers: 3 is the bad one)."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 3 else good)


@st.composite
def _answers(draw):
    """An answer text: arbitrary text, or the JSON object asked for, with odd values, odd literals or a code fence."""
    if draw(st.integers(0, 5)) == 5:
        return draw(_texts)
    fields = {key: draw(_mostly(_sentences, _json)) for key in GOOD}
    text = json.dumps(fields, ensure_ascii=draw(st.booleans()))
    if draw(st.integers(0, 2)) == 2:
        key = draw(st.sampled_from(list(GOOD)))
        text = text.replace(json.dumps(fields[key], ensure_ascii=False), draw(_literals), 1)
    if draw(st.integers(0, 2)) == 2:
        text = draw(st.sampled_from(["```json\n{}\n```", "Here it is: {} thanks", "{}  "])).format(text)
    return text


_usage_counts = st.one_of(st.integers(-5, 10 ** 6), st.integers(), st.floats(), st.text(max_size=12), st.none(),
                          st.sampled_from(["12", " 40 ", "-3", "1e3", "\u0663"]), _json)


@st.composite
def _bodies(draw):
    """A chat completion body: well formed around an arbitrary answer, or with any part missing or mistyped."""
    message = draw(_mostly(st.fixed_dictionaries({"role": st.just("assistant"), "content": _answers()}),
                           st.one_of(st.fixed_dictionaries({"content": _json}), _json)))
    choice = draw(_mostly(st.fixed_dictionaries({"index": st.just(0), "message": st.just(message),
                                                 "finish_reason": st.sampled_from(["stop", "length", None, 3])}),
                          _json))
    body = {"id": "cmpl", "object": "chat.completion",
            "choices": draw(_mostly(st.sampled_from([[choice], [choice, choice]]), _json)),
            "usage": draw(st.one_of(st.fixed_dictionaries({"prompt_tokens": _usage_counts,
                                                           "completion_tokens": _usage_counts}), _json))}
    if draw(st.integers(0, 5)) == 5:
        del body[draw(st.sampled_from(["choices", "usage"]))]
    return draw(_mostly(st.just(body), _json))


def test_arbitrary_answers_become_rows_or_counted_drops():
    seen = {"valid": 0, "dropped": 0}

    @hsettings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(_bodies(), min_size=1, max_size=4))
    def check(bodies):
        with tempfile.TemporaryDirectory() as out_dir:
            read, drops = _through_the_pipeline(bodies, out_dir)
        seen["valid"] += len(read)
        seen["dropped"] += sum(drops.values())

    check()
    # The strategies reach both outcomes: a check that drops everything (or nothing) proves little.
    assert seen["valid"] > 0 and seen["dropped"] > 0, seen


@hsettings(max_examples=200, deadline=None, derandomize=True)
@given(_answers())
def test_arbitrary_brainstorm_answers_give_tasks_a_row_can_hold_or_a_reason(text):
    try:
        tasks = parse_tasks(text)
    except Dropped as drop:
        assert drop.reason
        return
    assert tasks and all(10 < len(t) <= 500 and not text_problem(t) for t in tasks)
    json.dumps(tasks).encode("utf-8")


# ---- each known way to break a parser ---------------------------------------------------------------------------
def _answer_with(literal: str) -> str:
    return json.dumps({**GOOD, "S1": "@"}).replace('"@"', literal)


@pytest.mark.parametrize("content, reason", [
    (_answer_with("[" * 100_000 + "]" * 100_000), "nested_too_deep"),
    ("[" * 100_000 + "]" * 100_000, "nested_too_deep"),
    (_answer_with("7" * 5000), "huge_number"),
    (_answer_with('"a lone \\ud800 surrogate"'), "unencodable_text"),
    (json.dumps({**GOOD, "S1": "raw lone \udcff surrogate"}, ensure_ascii=False), "unencodable_text"),
    (_answer_with('"a NUL \\u0000 byte"'), "control_characters"),
    (json.dumps({**GOOD, "S1": "a raw NUL \x00 byte"}, ensure_ascii=False), "control_characters"),
    (_answer_with('"' + "x" * 2_000_000 + '"'), "answer_too_large"),
    (_answer_with('"' + "x" * 30_000 + '"'), "length_out_of_bounds"),
    (_answer_with("NaN"), "non_finite_number"),
    (_answer_with("Infinity"), "non_finite_number"),
    (_answer_with("1e400"), "non_finite_number"),
    (_answer_with('{"text": "an object"}'), "wrong_type"),
    (_answer_with('["a", "list"]'), "wrong_type"),
    ("{" + " " * 200_000 + "x}", "malformed_json"),  # (a regex with \s* before an anchor was quadratic here)
])
def test_hostile_answer_texts_are_dropped_with_their_reason(tmp_path, content, reason):
    body = {"choices": [{"index": 0, "message": {"content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20}}
    read, drops = _through_the_pipeline([body, {**body, "choices": [{"message": {"content": json.dumps(GOOD)}}]}],
                                        str(tmp_path))
    assert drops == {reason: 1} and len(read) == 1  # the good answer beside it is written


@pytest.mark.parametrize("body", [
    {"id": "no choices"}, {"choices": []}, {"choices": 5}, {"choices": "text"}, {"choices": [None]},
    {"choices": [{"index": 0}]}, {"choices": [{"message": "text"}]}, {"choices": [{"message": {"content": 7}}]},
    {"choices": [{"message": {"content": {"S1": "x"}}}]}, {"choices": [{"message": {"content": ["a"]}}]},
])
def test_malformed_envelopes_are_bad_responses_charged_at_their_reservation(tmp_path, body):
    read, drops = _through_the_pipeline([body], str(tmp_path))
    assert drops == {"request_bad_response": 1} and not read
    row = finish("example", ITEM, _outcome(body), SETTINGS)  # billed by the server, so counted at the worst case
    assert (row["prompt_tokens"], row["completion_tokens"]) == (estimate_tokens(ITEM["prompt"]), ITEM["max_tokens"])


@pytest.mark.parametrize("usage, expected", [
    ({"prompt_tokens": "12", "completion_tokens": 30.0}, (12, 30)),
    ({"prompt_tokens": "many", "completion_tokens": -3}, (None, None)),
    ({"prompt_tokens": None, "completion_tokens": float("nan")}, (None, None)),
    ({"prompt_tokens": 2.5, "completion_tokens": float("inf")}, (None, None)),
    ({"prompt_tokens": True, "completion_tokens": 10 ** 30}, (None, None)),
    ("usage", (None, None)), (None, (None, None)),
])
def test_unreadable_usage_keeps_the_row_and_charges_the_reservation(tmp_path, usage, expected):
    body = {"choices": [{"message": {"content": json.dumps(GOOD)}}], "usage": usage}
    read, drops = _through_the_pipeline([body], str(tmp_path))
    assert not drops and len(read) == 1
    reservation = (estimate_tokens(ITEM["prompt"]), ITEM["max_tokens"])
    want = tuple(e if e is not None else r for e, r in zip(expected, reservation))
    assert (read[0]["prompt_tokens"], read[0]["completion_tokens"]) == want


def test_text_with_unicode_line_separators_is_a_row_and_one_journal_record(tmp_path):
    """U+2028, U+2029 and U+0085 are text (JSON leaves them unescaped), not ends of journal lines."""
    fields = {**GOOD, "S1": "First line\u2028second\u2029third\x85fourth of the answer."}
    body = {"choices": [{"message": {"content": json.dumps(fields, ensure_ascii=False)}}]}
    read, drops = _through_the_pipeline([body], str(tmp_path))
    assert not drops and read[0]["query"] == fields["S1"]


def test_a_journal_line_with_unreadable_counts_or_bytes_does_not_stop_a_rerun(tmp_path):
    """A journal written before these checks may hold a string count or a line that is no JSON."""
    journal = tmp_path / "journal"
    journal.mkdir()
    lines = [json.dumps({"id": "a", "phase": "example", "drop": "", "prompt_tokens": "many", "completion_tokens": -1}),
             "[" * 100_000, '{"id": "b", "prompt_tokens": ' + "9" * 5000 + "}",
             json.dumps({"id": "c", "phase": "example", "drop": "not_json", "prompt_tokens": 4, "completion_tokens": 6})]
    (journal / "old.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    state = JournalState()
    for record in read_journal(str(tmp_path)):
        state.note(record)
    assert set(state.outcome) == {"a", "c"} and (state.prompt_tokens, state.completion_tokens) == (4, 6)


def test_batch_output_lines_that_break_json_are_skipped_and_charged_as_bad_responses(tmp_path):
    """An output file (downloaded through the real client from the test server) holding lines nested too deep,
    with a 5000-digit number, with a malformed body and with bytes that are not UTF-8: each is a bad response of
    its request (a completed part's missing line), never an exception; the good line is a row."""
    good = {"custom_id": "good", "response": {"status_code": 200, "body": {
        "choices": [{"message": {"content": json.dumps(GOOD)}}], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}}}
    lines = [json.dumps(good).encode(),
             b'{"custom_id": "deep", "response": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
             b'{"custom_id": "huge", "response": {"status_code": ' + b"2" * 5000 + b"}}",
             json.dumps({"custom_id": "body", "response": {"status_code": 200, "body": {"choices": "x"}}}).encode(),
             json.dumps({"custom_id": "status", "response": {"status_code": 10 ** 30, "body": None}}).encode(),
             b'{"custom_id": "bytes", "response": {"status_code": 200, "body": "\xff\xfe"}}']
    settings = GenerateSettings(backend="openai", model="gpt-4o-mini", batch_api=True, progress=False)
    with TestServer() as server:
        settings = settings.model_copy(update={"base_url": server.base_url})
        client = make_client(settings)
        uploaded = client.files.create(file=("out.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
        ids = ["good", "deep", "huge", "body", "status", "bytes"]
        phase = BatchPhase(settings, str(tmp_path), "example", client=client)
        phase.members["part"] = ids
        items = {rid: {**ITEM, "id": rid} for rid in ids}
        part = {"name": "part", "phase": "example", "status": "completed", "output_file_id": uploaded.id}
        again: list[dict] = []
        rows = {r["id"]: r for r in phase._collect(part, items, again)}
    assert not again and set(rows) == set(ids)
    assert rows["good"]["drop"] == "" and rows["good"]["query"] == GOOD["S1"]
    assert {rid: rows[rid]["drop"] for rid in ids[1:]} == {rid: "request_bad_response" for rid in ids[1:]}
    assert rows["deep"]["completion_tokens"] == ITEM["max_tokens"]  # billed: counted at the reservation


# ---- end to end -------------------------------------------------------------------------------------------------
def test_generate_cli_survives_hostile_answers_and_counts_them(ray_cluster, tmp_path):
    """``ray-e5 generate`` against a server whose every other answer is hostile (each kind of HOSTILE in turn): the
    stage completes, writes every good answer, and counts each hostile one under its reason; tokens are the
    server's counts where readable and the reservation where not."""
    address = ray_cluster.get_runtime_context().gcs_address
    run_dir = tmp_path / "run"
    max_tokens = 777
    with TestServer(faults=["ok", "hostile"]) as server:
        proc = subprocess.run(
            [sys.executable, "-m", "ray_e5.cli", "generate", "--address", address, "--num-examples", "30",
             "--set", f"run_dir={run_dir}", "--set", "generate.backend=endpoint",
             "--set", f"generate.base_url={server.base_url}", "--set", "generate.model=test-model",
             "--set", "generate.mix={sts: 1}", "--set", f"generate.max_tokens={max_tokens}",
             "--set", "generate.request_timeout_s=120", "--set", "generate.progress=false"],
            env={**os.environ}, capture_output=True, text=True, timeout=600)
        calls = list(server.calls)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
    modes = Counter(c.mode for c in calls)
    assert len(calls) == 30 and set(modes) == {"ok", *HOSTILE}  # every kind was sent, none retried
    expected = Counter()
    for mode, n in modes.items():
        if HOSTILE.get(mode):
            expected[HOSTILE[mode]] += n
    assert manifest["drops_this_run"] == dict(expected) and all(v > 0 for v in expected.values())
    rows = [r for p in sorted((run_dir / "synthetic").glob("*.parquet")) for r in pq.read_table(str(p)).to_pylist()]
    by_id = {c.request_id: c for c in calls}
    assert len(rows) == manifest["examples"] == modes["ok"] + modes["bad_usage"] > 0
    for row in rows:
        call = by_id[row["id"]]
        assert not any(text_problem(row[k]) for k in TEXT_COLUMNS) and row["query"] and row["positive"]
        if call.mode == "bad_usage":  # completion counts are all unreadable; "12" is the one readable prompt count
            assert row["completion_tokens"] == max_tokens
            assert row["prompt_tokens"] in (12, estimate_tokens(call.prompt))
        else:
            assert (row["prompt_tokens"], row["completion_tokens"]) == (call.prompt_tokens, call.completion_tokens)
    envelope = sum(n for m, n in modes.items() if HOSTILE.get(m) == "request_bad_response")
    content = [c for c in calls if HOSTILE.get(c.mode) not in (None, "", "request_bad_response")]
    assert manifest["tokens"]["completion"] == (sum(r["completion_tokens"] for r in rows) + max_tokens * envelope
                                                + sum(c.completion_tokens for c in content))
