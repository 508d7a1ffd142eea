"""The generation stage: plan (seeded placeholder sampling) -> brainstorm -> expand -> generate (Ray Data,
autoscaling actor pool, bounded concurrency) -> parse and validate (in the workers) -> exact and near-duplicate
removal -> contamination filter -> Parquet shards + manifest.json under ``<run_dir>/synthetic``.

Resume: every request has a content-addressed id (a hash of its prompt, slot and seed), and every answer is
journaled by the actor that received it (:mod:`ray_e5.generate.journal`). A rerun into the same run directory writes
the answered rows that never reached a shard, never sends a request again whose answer was received, reuses the
frozen brainstorm, and seeds the duplicate filter with the rows on disk; tokens, cost and drops are counted from the
journal, one outcome per request. Malformed answers are dropped and counted by reason, never raised; a backend that
is gone (a dead llama.cpp server, the first requests all failing to connect) and a run that wrote nothing stop the
stage with an error that says why.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack, contextmanager
from collections import Counter
from typing import Any

from ray_e5 import storage
from ray_e5.config import RayE5Config
from ray_e5.rundir import MANIFEST_FILE, SYNTHETIC_DIR, RunDir
from ray_e5.generate.backends import FATAL_STATUSES, is_transient
from ray_e5.capacity import Demand, check_fits
from ray_e5.generate.config import GenerateSettings
from ray_e5.generate.errors import BackendError, EmptySyntheticError, GenerateError
from ray_e5.generate.filters import ContaminationFilter, Deduplicator
from ray_e5.generate.journal import JournalWriter, load_state
from ray_e5.generate.llamacpp import LlamaCppServer, private_log
from ray_e5.generate.plan import brainstorm_requests, expand, plan_slots
from ray_e5.generate.completions import completions, model_name
from ray_e5.generate.result import GenerateResult
from ray_e5.generate.store import Store, Tally

__all__ = ["generate", "GenerateResult", "GenerateError", "BackendError", "EmptySyntheticError"]
# The first requests of a phase that all failing to get any answer (connection errors, 5xx) stops the stage.
FIRST_REQUESTS = 8

# Used for a brainstorm group whose request failed and that has no sibling group of the same kind to borrow from.
FALLBACK_TASKS = {
    "short-long": ["Given a web search query, retrieve relevant passages that answer the query.",
                   "Given a question about a product, retrieve user reviews that answer it."],
    "long-short": ["Classify a customer review as positive, negative or neutral.",
                   "Identify the main topic of a news article."],
    "short-short": ["Given a short question, retrieve a short answer that matches it.",
                    "Given a scientific finding in one sentence, retrieve the title of the paper that reports it."],
    "long-long": ["Given a long news article, retrieve another article about the same event.",
                  "Given a scientific abstract, retrieve abstracts that build on the same method."],
}


def _secret(settings: GenerateSettings):
    """The API key as a SecretStr (never printed), read here on the driver: actors on other nodes lack the env."""
    from pydantic import SecretStr

    env = settings.key_env()
    value = os.environ.get(env) if env else None
    return SecretStr(value) if value else None


def _fatal(settings: GenerateSettings, drops: dict[str, int], ok: int, phase: str) -> None:
    """Every request refused for the same configuration reason: stop with a clear message instead of counting."""
    fatal = {k: v for k, v in drops.items() if k in {f"request_http_{s}" for s in FATAL_STATUSES}}
    if ok or not fatal or sum(fatal.values()) < sum(drops.values()):
        return
    code = max(fatal, key=fatal.get).rsplit("_", 1)[1]
    hint = {"401": f"the API key in ${settings.key_env()} was refused",
            "403": f"the API key in ${settings.key_env()} has no access to this model",
            "404": f"model (or deployment) {model_name(settings)!r} or base_url {settings.base_url!r} not found"}[code]
    raise GenerateError(f"generate: every {phase} request failed with HTTP {code}: {hint}; nothing was written")


@contextmanager
def _ray_data_quiet():
    """Our own progress bar replaces Ray Data's while the stage runs."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


def _progress(settings: GenerateSettings, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not settings.progress, mininterval=1.0, dynamic_ncols=True)


class _Run:
    """One invocation of the stage: its settings, where it writes, what it counted."""

    def __init__(self, config: RayE5Config):
        self.started = time.time()
        self.settings = config.section("generate", GenerateSettings)
        self.settings.preflight()
        self.config = config
        self.deadline = self.started + self.settings.time_budget_s if self.settings.time_budget_s else None
        self.tally = Tally()
        # Refuse bad evaluation paths before any request.
        try:
            self.contamination = ContaminationFilter.from_config(config, self.settings)
        except FileNotFoundError as err:
            raise GenerateError(str(err)) from None
        self.out_dir = RunDir.of(config.run_dir).synthetic
        self.store = Store(self.out_dir)
        self.previous = self.store.load_manifest()
        self.dedup = Deduplicator(self.settings.near_duplicate_threshold)
        self.written_ids: set[str] = set()
        for row in self.store.scan():
            self.written_ids.add(row["id"])
            self.tally.add_row(row)
            self.dedup.check(row)
        self.journal = load_state(self.out_dir, self.written_ids)  # what earlier runs were answered and paid for
        self.spent_before = (self.journal.prompt_tokens, self.journal.completion_tokens)
        self.filtered: dict[str, str] = {}  # example id -> duplicate/contamination reason (the driver's filters)
        self.shards = [p.rsplit("/", 1)[-1] for p in self.store.shard_paths()]
        self.brainstorm_info: dict[str, Any] = {}
        self.pending = 0
        self.server: LlamaCppServer | None = None
        self.url = self.settings.base_url or ""
        self.driver_journal: JournalWriter | None = None  # vLLM rows come back to the driver, which journals them
        self.quality: dict[str, dict] = {}
        self.consistency_info: dict[str, Any] | None = None

    # ---- guards ----------------------------------------------------------------------------------------------
    def _check_backend(self, phase: str, answered: int, transport: Counter) -> None:
        """Stop when the backend is gone: a dead llama.cpp server, or the first requests all without an answer."""
        if self.server is not None and self.server.death():
            raise BackendError(self.server.death())
        failed = sum(transport.values())
        if answered == 0 and failed >= FIRST_REQUESTS:
            reasons = ", ".join(f"{k} x{v}" for k, v in transport.most_common())
            raise BackendError(f"generate: the first {failed} {phase} requests to {self.url or 'the backend'} all "
                               f"failed without an answer ({reasons}) after the client's retries; is the server up "
                               f"and generate.base_url right? Nothing was lost: a rerun sends them again")

    def _rows(self, items: list[dict], phase: str, kwargs: dict):
        """The output rows of ``items``; every answer is journaled (by the actors, or here for vLLM)."""
        transport: Counter = Counter()
        answered = 0
        if self.settings.batch_api:  # the Batch API: answers come back to the driver, which journals them
            from ray_e5.generate.batch_api import batch_rows

            spent = self.settings.cost_usd(self.spent_before[0] + self.tally.prompt_tokens,
                                           self.spent_before[1] + self.tally.completion_tokens) or 0.0
            source = batch_rows(items, phase, self.settings, self.out_dir, spent)
        else:
            source = completions(items, phase, self.settings, journal_dir=None if self.driver_journal is not None
                                 else self.out_dir, **kwargs).iter_rows()
        for row in source:
            drop = row["drop"]
            if not drop.startswith("skipped_"):
                if self.driver_journal is not None:
                    self.driver_journal.append({**row, "phase": phase})
                if is_transient(drop):
                    transport[drop] += 1
                else:
                    answered += 1
            self._check_backend(phase, answered, transport)
            yield row

    # ---- brainstorm ----------------------------------------------------------------------------------------
    def brainstorm(self, slots, request_kwargs) -> dict[str, list[str]]:
        state = self.store.load_brainstorm()
        wanted = brainstorm_requests(self.settings, slots)
        todo, failed = [], []
        for r in wanted:  # an answer journaled by a killed run is not asked for again
            if state.get(r["key"], {}).get("id") == r["id"]:
                continue
            rec = self.journal.brainstorm.get(r["id"])
            if rec is not None and not rec.get("drop"):
                state[r["key"]] = {"id": r["id"], "kind": r["kind"], "tasks": json.loads(rec["tasks"]),
                                   "source": "llm"}
            elif rec is not None and not is_transient(rec["drop"]):
                failed.append(r["key"])  # answered, but with no usable task: borrowed below, as in the run itself
            else:
                todo.append(r)
        ok = 0
        if todo:
            bar = _progress(self.settings, len(todo), "brainstorm")
            last_save = time.monotonic()
            for row in self._rows(todo, "brainstorm", request_kwargs):
                self.tally.add_tokens(row)
                bar.update(1)
                if row["drop"]:
                    self.tally.brainstorm_drops[row["drop"]] += 1
                    if not row["drop"].startswith("skipped_"):
                        failed.append(row["key"])
                    continue
                ok += 1
                state[row["key"]] = {"id": row["id"], "kind": row["kind"], "tasks": json.loads(row["tasks"]),
                                     "source": "llm"}
                if time.monotonic() - last_save > self.settings.flush_every_s:
                    self.store.save_brainstorm(state)
                    last_save = time.monotonic()
            bar.close()
            _fatal(self.settings, self.tally.brainstorm_drops, ok, "brainstorm")
        if todo or failed:
            by_key = {r["key"]: r for r in wanted}
            for key in sorted(set(failed)):  # freeze a failed group on a sibling's tasks so its examples can go on
                kind = key.split("/")[0]
                sibling = next((v for k, v in sorted(state.items()) if v.get("kind") == kind
                                and v.get("source") == "llm"), None)
                state[key] = {"id": by_key[key]["id"], "kind": kind,
                              "tasks": sibling["tasks"] if sibling else FALLBACK_TASKS[kind],
                              "source": "borrowed" if sibling else "fallback"}
            self.store.save_brainstorm(state)
        ids = {r["key"]: r["id"] for r in wanted}
        current = set(ids)
        tasks = {k: v["tasks"] for k, v in state.items() if k in ids and v.get("id") == ids[k]}
        every = [t for k in tasks for t in tasks[k]]
        self.brainstorm_info = {
            "groups": len(wanted), "requested_this_run": len(todo), "tasks": len(every), "unique_tasks": len(set(every)),
            "borrowed_groups": sum(1 for k in current if state.get(k, {}).get("source") == "borrowed"),
            "fallback_groups": sum(1 for k in current if state.get(k, {}).get("source") == "fallback")}
        return tasks

    # ---- examples ------------------------------------------------------------------------------------------
    def _accept(self, row: dict, buffer: list[dict]) -> bool:
        reason = self.dedup.check(row) or self.contamination.check(row)
        if reason:
            self.filtered[row["id"]] = reason
            return False
        buffer.append(row)
        return True

    def examples(self, slots, tasks, request_kwargs) -> None:
        s = self.settings
        items, waiting = expand(s, slots, tasks)
        planned = {i["id"] for i in items}
        buffer: list[dict] = []
        for rid, row in sorted(self.journal.unwritten.items()):  # answered before a kill, never written
            if rid in planned:
                self._accept(row, buffer)
        if buffer:
            self._flush(buffer)
            buffer = []
        pending = [i for i in items if i["id"] not in self.written_ids and i["id"] not in self.filtered
                   and not self.journal.answered(i["id"])]
        self.pending = len(pending) + len(waiting)
        if waiting:  # their brainstorm was skipped (time or budget): so are they
            reason = next((r for r in ("skipped_budget", "skipped_batch_failed", "skipped_batch_expired",
                                       "skipped_batch_error") if self.tally.brainstorm_drops.get(r)),
                          "skipped_time_budget")  # (skipped_batch_*: a brainstorm batch that did not run)
            self.tally.drops[reason] += len(waiting)
        if not pending:
            return
        bar = _progress(s, len(pending), "generate")
        last_flush = time.monotonic()
        ok = 0
        try:
            for row in self._rows(pending, "example", request_kwargs):
                self.tally.requests += 1
                self.tally.add_tokens(row)
                if not row["drop"].startswith("skipped_"):
                    self.journal.outcome[row["id"]] = row["drop"]
                if row["drop"]:
                    self.tally.drops[row["drop"]] += 1
                elif self._accept(row, buffer):
                    ok += 1
                else:
                    self.tally.drops[self.filtered[row["id"]]] += 1
                bar.update(1)
                if len(buffer) >= s.shard_size or (buffer and time.monotonic() - last_flush > s.flush_every_s):
                    self._flush(buffer)
                    buffer, last_flush = [], time.monotonic()
                    bar.set_postfix(written=self.tally.written, dropped=sum(self.tally.drops.values()),
                                    refresh=False)
                if ok == 0 and self.tally.requests % 20 == 0:  # a refused key fails fast, not after every request
                    _fatal(s, self.tally.drops, ok, "example")
        finally:  # a stop (a dead backend, Ctrl-C) keeps every valid row already received
            bar.close()
            if buffer:
                self._flush(buffer)
        _fatal(s, self.tally.drops, ok, "example")

    def _flush(self, rows: list[dict]) -> None:
        self.shards.append(self.store.write_shard(rows))
        for row in rows:
            self.tally.add_row(row)
            self.written_ids.add(row["id"])
        self.tally.written += len(rows)
        self.store.save_manifest(self.manifest())

    # ---- manifest ------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        s, t, p = self.settings, self.tally, self.previous
        wall = time.time() - self.started
        # One outcome per request id over every run (the journal), so nothing is counted twice.
        drops = Counter(reason for rid, reason in self.journal.outcome.items()
                        if reason and rid not in self.written_ids)
        drops.update(reason for rid, reason in self.filtered.items() if rid not in self.written_ids)
        prompt = self.spent_before[0] + t.prompt_tokens
        completion = self.spent_before[1] + t.completion_tokens
        cost, cost_now = s.cost_usd(prompt, completion), s.cost_usd(t.prompt_tokens, t.completion_tokens)
        return {
            "examples": sum(t.by_kind.values()), "planned": s.num_examples, "written_this_run": t.written,
            "pending_this_run": self.pending, "requests_this_run": t.requests,
            "by_kind": dict(sorted(t.by_kind.items())), "by_language": dict(t.by_language.most_common()),
            "drops": dict(sorted(drops.items())), "drops_this_run": dict(t.drops),
            "brainstorm": {**self.brainstorm_info, "drops_this_run": dict(t.brainstorm_drops)},
            "tokens": {"prompt": prompt, "completion": completion},
            "tokens_this_run": {"prompt": t.prompt_tokens, "completion": t.completion_tokens},
            "cost_usd": None if cost is None else round(cost, 6),
            "cost_usd_this_run": None if cost_now is None else round(cost_now, 6),
            "wall_seconds": round(p.get("wall_seconds", 0) + wall, 1), "wall_seconds_this_run": round(wall, 1),
            "completion_tokens_per_s_this_run": round(t.completion_tokens / wall, 2) if wall > 0 else 0.0,
            "backend": s.backend, "model": model_name(s), "shards": list(self.shards),
            "llamacpp_system_info": self.server.info if self.server is not None else None,
            "runs": p.get("runs", 0) + 1, "settings": s.model_dump(mode="json"),
            "quality_by_kind": self.quality, "consistency": self.consistency_info,
        }

    # ---- consistency -----------------------------------------------------------------------------------------
    def consistency(self) -> None:
        """Score every row on disk (earlier runs' too) with the reference embedder, in a Ray task; record the
        drops (synthetic/consistency.json) and per-kind quality for the manifest. Rows are never deleted."""
        import ray

        from ray_e5.generate.consistency import quality, score_rows, write_dropped

        rows = list(self.store.scan(("id", "kind", "query", "positive", "negative")))
        c = self.settings.consistency
        dropped: dict[str, str] = {}
        if c is not None and rows:
            task = ray.remote(num_cpus=c.cpus)(score_rows)
            print(f"[ray-e5 generate] consistency: scoring {len(rows)} rows with {c.model}", flush=True)
            dropped = ray.get(task.remote(rows, c.model, c.top_k, c.pool, self.settings.seed, int(c.cpus) or 1))
            write_dropped(self.out_dir, dropped, c.model_dump(mode="json"))
            self.consistency_info = {**c.model_dump(mode="json"), "rows": len(rows), "dropped": len(dropped),
                                     "kept_share": round(1 - len(dropped) / len(rows), 3),
                                     "reasons": dict(Counter(dropped.values()))}
            print(f"[ray-e5 generate] consistency: kept {len(rows) - len(dropped)} of {len(rows)} rows "
                  f"({', '.join(f'{k} x{v}' for k, v in Counter(dropped.values()).most_common()) or 'none dropped'})",
                  flush=True)
        self.quality = quality(rows, dropped)


def _demands(s: GenerateSettings) -> list[Demand]:
    """What the stage asks Ray for before it starts: at least one generation actor, or vLLM's batch engines (the
    Batch API needs neither; the served engines are checked where they are deployed, in ``VllmServer``)."""
    if s.backend == "vllm" and s.vllm.engine == "batch":  # ray.data.llm starts the engines per phase
        from ray_e5.generate.vllm_server import engine_demand

        return [engine_demand(s)]
    if s.batch_api:
        return []
    return [Demand("generate.actor_cpus", "generation actor", {"CPU": s.actor_cpus}, 1)]


def _llamacpp_log(out_dir: str) -> tuple[str, str | None]:
    """Where the llama.cpp server logs: ``<run_dir>/synthetic/llamacpp.log`` itself for a local run dir; else a
    local file that is copied there when the stage ends (an object store has no append)."""
    if storage.is_local(out_dir):
        return storage.resolve(storage.join(out_dir, "llamacpp.log"))[1], None
    return private_log(), storage.join(out_dir, "llamacpp.log")


def _write_card(out_dir: str, manifest: dict) -> None:
    """The dataset card (synthetic/README.md), rewritten from the manifest at each run's end; a card that cannot be
    written (a library missing) is reported, never a reason to lose the stage's result."""
    from ray_e5.generate.card import write_dataset_card

    try:
        write_dataset_card(out_dir, manifest)
    except Exception as err:  # noqa: BLE001 - documentation, not data
        print(f"[ray-e5 generate] the dataset card could not be written: {err}", flush=True)


def _empty(manifest: dict) -> str:
    drops = ", ".join(f"{k} x{v}" for k, v in sorted(manifest["drops_this_run"].items(), key=lambda kv: -kv[1]))
    return (f"generate: no valid synthetic row was written for a plan of {manifest['planned']} examples "
            f"(this run: {manifest['requests_this_run']} requests; drops: {drops or 'none'}); see "
            f"{manifest.get('where', f'{SYNTHETIC_DIR}/{MANIFEST_FILE}')}. Raise generate.time_budget_s or max_tokens, use a "
            "stronger generator, or pass --allow-empty-synthetic to train without synthetic data")


def generate(config: RayE5Config) -> GenerateResult:
    """Generate ``generate.num_examples`` planned examples into ``<run_dir>/synthetic``; return the manifest it
    wrote, with the rows on disk per kind.

    Raises :class:`EmptySyntheticError` when the plan is not empty and no valid row is on disk at the end, and
    :class:`BackendError` when the backend is gone (after writing every valid row received). One driver at a time
    per run directory (:mod:`ray_e5.lease`): two would send and pay for the same pending requests."""
    from ray_e5.lease import hold_lease

    with hold_lease(config.run_dir, "generate"):
        return _generate(config)


def _generate(config: RayE5Config) -> GenerateResult:
    run = _Run(config)  # validates the section and the eval paths, reads what earlier runs wrote
    s = run.settings
    slots = plan_slots(s)
    upload_log = None
    with ExitStack() as stack:
        from ray_e5.cluster import connect

        ray = connect(config.ray_address)
        check_fits(_demands(s))
        stack.enter_context(_ray_data_quiet())
        kwargs: dict[str, Any] = {"deadline": run.deadline}
        if s.batch_api or (s.backend == "vllm" and s.vllm.engine == "batch"):  # answers reach the driver
            run.driver_journal = JournalWriter(run.out_dir)
            stack.callback(run.driver_journal.close)
        else:
            kwargs["base_url"] = s.base_url
            kwargs["api_key"] = _secret(s)
            if s.backend == "llamacpp":
                log_path, upload_log = _llamacpp_log(run.out_dir)
                if upload_log:
                    stack.callback(lambda: storage.write_text(upload_log, open(log_path, errors="replace").read()))
                run.server = stack.enter_context(LlamaCppServer(s.gguf, n_ctx=s.llamacpp_ctx, log_path=log_path))
                print(f"[ray-e5 generate] llama.cpp {run.server.info} (log: {upload_log or log_path})", flush=True)
                kwargs["base_url"] = run.url = run.server.base_url
                kwargs["node_id"] = ray.get_runtime_context().get_node_id()
            if s.backend == "vllm":  # one engine set, served, for both steps
                from ray_e5.generate.vllm_server import VllmServer

                kwargs["base_url"] = run.url = stack.enter_context(VllmServer(s)).base_url
            if s.requests_per_minute or s.tokens_per_minute or s.budget_usd is not None:
                from ray_e5.generate.ledger import Ledger

                spent = s.cost_usd(*run.spent_before) or 0.0
                # On the driver's node: a worker node the autoscaler removes would take the shared limits with it.
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                ledger = ray.remote(Ledger).options(num_cpus=0, scheduling_strategy=here).remote(
                    s.requests_per_minute, s.tokens_per_minute, s.budget_usd, s.price(), spent)
                kwargs["ledger"] = ledger
                stack.callback(ray.kill, ledger)
        tasks = run.brainstorm(slots, kwargs)
        run.examples(slots, tasks, kwargs)
        run.consistency()
    manifest = run.manifest()
    run.store.save_manifest(manifest)
    _write_card(run.out_dir, manifest)
    if manifest["examples"] == 0 and s.num_examples > 0:
        raise EmptySyntheticError(_empty({**manifest, "where": storage.join(run.out_dir, MANIFEST_FILE)}), manifest,
                                  run.out_dir)
    return GenerateResult.from_manifest(manifest, run.out_dir)
