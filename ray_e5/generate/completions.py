"""The Ray Data operator that turns planned requests into parsed rows, for every backend.

OpenAI-compatible backends run in an autoscaling actor pool (1 to ``actors`` actors) of :class:`ChatCompleter`s:
an async UDF, so each actor overlaps several batches on one event loop while a semaphore keeps at most
``concurrency`` requests in flight per actor. vLLM runs as ``ray.data.llm``'s processor; the in-process writer
(``transformers``) as an actor pool of :class:`LocalCompleter`s. Either way each request
comes back as one row: the parsed and validated answer, or empty texts and a ``drop`` reason. Parsing happens in
the workers, so the driver only filters and writes.

No answer can stop the stage: :func:`finish` turns any answer (any text, any envelope, any usage counts) into
either a row that JSON Lines and Parquet can hold or a counted drop reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from ray_e5.generate.backends import ChatBackend, Completion, vllm_completion
from ray_e5.generate.config import GenerateSettings
from ray_e5.generate.parse import Dropped, parse_json, parse_tasks, validate_answer
from ray_e5.generate.store import COLUMNS
from ray_e5.generate.taxonomy import KINDS, to_row

EXAMPLE_COLUMNS = (*COLUMNS, "drop")
BRAINSTORM_COLUMNS = ("id", "key", "kind", "tasks", "prompt_tokens", "completion_tokens", "drop")
# A parse failure on an answer the server cut at max_tokens is named for its cause.
_CUT = ("empty_answer", "not_json", "truncated_json", "malformed_json")
# What an answer that broke an assumption of ours (a bug, not the answer's fault) is counted as; never expected.
UNEXPECTED = "answer_unexpected_error"
log = logging.getLogger(__name__)


def model_name(settings: GenerateSettings) -> str:
    return settings.vllm.model if settings.backend == "vllm" else settings.model


def estimate_tokens(text: str) -> int:
    """A generous prompt-token estimate for reservations (about 3 characters per token)."""
    return len(text) // 3 + 8


def answer_limit(kind, settings: GenerateSettings) -> int:
    """The most characters an answer of ``kind`` may have: its fields at ``max_chars``, every character written
    as a six-character JSON escape, plus room for keys and a code fence; a longer one is ``answer_too_large``."""
    return len(kind.output_keys) * settings.max_chars * 6 + 4096


def charged(item: dict, result: Completion | Dropped) -> tuple[int, int]:
    """The (prompt, completion) tokens an outcome is counted at: the answer's usage, or where a count is missing or
    unreadable (a string, null, negative), the request's reservation (the prompt estimate and ``max_tokens``), so
    that tokens, cost and ``budget_usd`` never undercount. A request without an answer costs nothing; one answered
    with a body that is not a chat completion (``request_bad_response``, billed all the same) costs its reservation."""
    if isinstance(result, Dropped):
        result = Completion(None, None, None) if result.reason == "request_bad_response" else None
    if result is None:
        return 0, 0
    prompt, completion = result.prompt_tokens, result.completion_tokens
    return (prompt if prompt is not None else estimate_tokens(item["prompt"]),
            completion if completion is not None else int(item["max_tokens"]))


def finish(phase: str, item: dict, result: Completion | Dropped, settings: GenerateSettings) -> dict:
    """One planned request and its outcome as an output row of ``phase`` ("example" or "brainstorm"): valid text,
    or empty texts and a ``drop`` reason; it never raises for anything in the answer."""
    tokens = charged(item, result)
    if phase == "brainstorm":
        out = {"id": item["id"], "key": item["key"], "kind": item["kind"], "tasks": "[]",
               "prompt_tokens": tokens[0], "completion_tokens": tokens[1], "drop": ""}
    else:
        out = {k: item[k] for k in ("id", "kind", "task", "language", "prompt_id")}
        out.update(query="", positive="", negative="", backend=settings.backend, model=model_name(settings),
                   prompt_tokens=tokens[0], completion_tokens=tokens[1], drop="")
    if isinstance(result, Dropped):
        return {**out, "drop": result.reason}
    try:
        if phase == "brainstorm":
            return {**out, "tasks": json.dumps(parse_tasks(result.text))}
        kind = KINDS[item["kind"]]
        fields = validate_answer(parse_json(result.text, answer_limit(kind, settings)), kind, settings.min_chars,
                                 settings.max_chars, prompt=item.get("prompt", ""), task=item.get("task", ""))
        return {**out, **to_row(kind, fields, item["task"], item["language"], item.get("tgt_language") or None)}
    except Dropped as drop:
        reason = "truncated_max_tokens" if result.finish_reason == "length" and drop.reason in _CUT else drop.reason
        return {**out, "drop": reason}
    except Exception as err:  # a bug of ours met by some answer: counted, never the end of the stage
        log.warning("generate: an answer to %s raised %s; dropped as %s", item.get("id"), type(err).__name__,
                    UNEXPECTED)
        return {**out, "drop": UNEXPECTED}


def plain_rows(batch: dict) -> list[dict]:
    def plain(v):
        return v.item() if hasattr(v, "item") else v

    return [{k: plain(v) for k, v in zip(batch, values)} for values in zip(*batch.values())]


class ChatCompleter:
    """Ray Data UDF (one per actor): sends planned requests through an OpenAI-compatible client."""

    def __init__(self, settings: GenerateSettings, phase: str, base_url: str | None, api_key=None, ledger=None,
                 deadline: float | None = None, journal_dir: str | None = None):
        self.settings, self.phase, self.base_url = settings, phase, base_url
        self.journal_dir = journal_dir
        self.journal = None
        self.recovered: dict[str, dict] = {}  # id -> row answered before this actor was restarted
        self.api_key = api_key  # a pydantic SecretStr: its repr never shows the key
        self.ledger, self.deadline = ledger, deadline
        self.backend: ChatBackend | None = None
        self.gate: asyncio.Semaphore | None = None
        self.columns = BRAINSTORM_COLUMNS if phase == "brainstorm" else EXAMPLE_COLUMNS

    def _late(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    async def _request(self, item: dict) -> Completion | Dropped:
        async with self.gate:
            if self._late():
                return Dropped("skipped_time_budget")
            estimate, max_tokens = estimate_tokens(item["prompt"]), int(item["max_tokens"])
            if self.ledger is not None and not await self.ledger.acquire.remote(estimate, max_tokens):
                return Dropped("skipped_budget")
            result: Completion | Dropped = Dropped("skipped_time_budget")
            try:
                if not self._late():  # waiting for the rate limit may have taken us past the deadline
                    result = await self.backend.complete(item["prompt"], json.loads(item["schema"]), max_tokens,
                                                         request_id=item["id"])
            except Dropped as drop:
                result = drop
            finally:
                if self.ledger is not None:
                    await self.ledger.settle.remote(estimate, max_tokens, *charged(item, result))
            return result

    async def _answer(self, item: dict) -> dict:
        """One request as an output row, journaled the moment it is answered (see :mod:`ray_e5.generate.journal`)."""
        known = self.recovered.get(item["id"])
        if known is not None:  # answered before this actor died and was restarted: Ray retries its batch
            return {key: known.get(key, "") for key in self.columns}
        result = await self._request(item)
        row = finish(self.phase, item, result, self.settings)
        if self.journal is not None and not row["drop"].startswith("skipped_"):
            self.journal.append({**row, "phase": self.phase})
        return row

    async def __call__(self, batch: dict) -> dict[str, list]:
        if self.backend is None:  # built on the actor's event loop, shared by its overlapping batches
            key = self.api_key.get_secret_value() if self.api_key is not None else None
            self.backend = ChatBackend(self.settings, self.base_url, key)
            self.gate = asyncio.Semaphore(self.settings.concurrency)
            if self.journal_dir is not None:
                from ray_e5.generate.journal import JournalWriter, answered_rows

                self.journal = JournalWriter(self.journal_dir)
                import ray

                if ray.get_runtime_context().was_current_actor_reconstructed:  # a batch Ray retries after a crash
                    self.recovered = answered_rows(self.journal_dir, self.phase)
        rows = await asyncio.gather(*(self._answer(item) for item in plain_rows(batch)))
        if self.journal is not None:
            self.journal.flush()
        return {key: [r[key] for r in rows] for key in self.columns}


class LocalCompleter:
    """Ray Data UDF (one per actor) for the in-process writer: samples a whole batch of planned requests with
    :class:`ray_e5.generate.local_writer.BatchedSampler` and journals each answer."""

    def __init__(self, settings: GenerateSettings, phase: str, deadline: float | None = None,
                 journal_dir: str | None = None):
        from ray_e5.generate.local_writer import BatchedSampler

        self.settings, self.phase, self.deadline = settings, phase, deadline
        self.columns = BRAINSTORM_COLUMNS if phase == "brainstorm" else EXAMPLE_COLUMNS
        self.sampler = BatchedSampler(settings.model, threads=int(settings.actor_cpus) or 1, seed=settings.seed)
        self.journal = None
        if journal_dir is not None:
            from ray_e5.generate.journal import JournalWriter

            self.journal = JournalWriter(journal_dir)

    def __call__(self, batch: dict) -> dict[str, list]:
        from ray_e5.generate.prompts import answer_text

        items = plain_rows(batch)
        if self.deadline is not None and time.time() > self.deadline:
            results: list[Completion | Dropped] = [Dropped("skipped_time_budget")] * len(items)
        else:
            def whole(i: int, text: str) -> bool:  # the answer's JSON object is closed: the rest would be waste
                try:
                    json.loads(answer_text(items[i]["prompt"], text))
                    return True
                except ValueError:
                    return False

            sampled = self.sampler.sample([i["prompt"] for i in items], [int(i["max_tokens"]) for i in items],
                                          self.settings.temperature, self.settings.top_p, complete=whole,
                                          deadline=self.deadline)
            results = [Dropped("skipped_time_budget") if s.finish_reason == "deadline" else
                       Completion(answer_text(item["prompt"], s.text), s.prompt_tokens, s.completion_tokens,
                                  s.finish_reason) for item, s in zip(items, sampled)]
        rows = [finish(self.phase, item, result, self.settings) for item, result in zip(items, results)]
        if self.journal is not None:
            for row in rows:
                if not row["drop"].startswith("skipped_"):
                    self.journal.append({**row, "phase": self.phase})
            self.journal.flush()
        return {key: [r[key] for r in rows] for key in self.columns}


def batches_by_kind(items: list[dict], size: int) -> list[dict]:
    """``items`` reordered so that each run of ``size`` holds one kind (prompts of one length and one token limit:
    a batched writer then pads little and no short answer waits for a long one), the kinds' runs taking turns so
    that a time budget ending early still leaves every kind its share."""
    by_kind: dict[str, list[dict]] = {}
    for item in items:
        by_kind.setdefault(item.get("kind", ""), []).append(item)
    runs = [[group[i:i + size] for i in range(0, len(group), size)] for group in by_kind.values()]
    ordered: list[dict] = []
    for turn in range(max((len(r) for r in runs), default=0)):
        for kind_runs in runs:
            if turn < len(kind_runs):
                ordered.extend(kind_runs[turn])
    return ordered


def completions(items: list[dict], phase: str, settings: GenerateSettings, *, base_url: str | None = None,
                api_key=None, ledger=None, deadline: float | None = None, node_id: str | None = None,
                journal_dir: str | None = None):
    """A Ray Dataset of output rows (``BRAINSTORM_COLUMNS`` or ``EXAMPLE_COLUMNS``), one per planned request."""
    import ray

    if settings.backend == "vllm" and settings.vllm.engine == "batch":
        from ray_e5.generate.backends import vllm_processor

        ds = ray.data.from_items(items)
        return vllm_processor(settings)(ds).map(  # one processor for both phases
            lambda row: finish(phase, row, vllm_completion(row, settings), settings))

    if settings.backend == "transformers":  # the in-process writer: whole batches per call, one model per actor
        ordered = batches_by_kind(items, settings.writer_batch)
        ds = ray.data.from_items(ordered, override_num_blocks=max(1, math.ceil(len(items) / settings.writer_batch)))
        return ds.map_batches(
            LocalCompleter, batch_size=settings.writer_batch, num_cpus=settings.actor_cpus,
            fn_constructor_kwargs={"settings": settings, "phase": phase, "deadline": deadline,
                                   "journal_dir": journal_dir},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=settings.actors))

    # Each block is one batch; an actor overlaps 4 of them, which keeps 2x `concurrency` requests queued behind
    # its semaphore and so hides the tail of each batch.
    batch = max(1, math.ceil(settings.concurrency / 2))
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch)))
    # A server on this node's loopback (llama.cpp): keep the actors on this node.
    where = {"label_selector": {"ray.io/node-id": node_id}} if node_id is not None else {}
    return ds.map_batches(
        ChatCompleter, batch_size=batch, num_cpus=settings.actor_cpus,
        fn_constructor_kwargs={"settings": settings, "phase": phase, "base_url": base_url, "api_key": api_key,
                               "ledger": ledger, "deadline": deadline, "journal_dir": journal_dir},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=settings.actors, max_tasks_in_flight_per_actor=4,
                                           max_concurrent_calls_per_actor=4),
        **where)
