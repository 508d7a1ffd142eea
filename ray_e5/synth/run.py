"""The generation stage: plan (seeded placeholder sampling) -> brainstorm -> expand -> generate (Ray Data,
autoscaling actor pool, bounded concurrency) -> parse and validate (in the workers) -> exact and near-duplicate
removal -> contamination filter -> Parquet shards + manifest.json under ``<run_dir>/synthetic``.

Resume: every request has a content-addressed id (a hash of its prompt, slot and seed). A rerun into the same run
directory reads the ids already written and asks only for the others, reuses the frozen brainstorm, and seeds the
duplicate filter with the rows on disk: a killed run continues with no duplicate rows and no repeated request for
work already written. Malformed answers and failed calls are dropped and counted by reason, never raised.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack, contextmanager
from typing import Any

from ray_e5 import runs
from ray_e5.config import ConfigError, RayE5Config
from ray_e5.synth.backends import FATAL_STATUSES, LlamaCppServer
from ray_e5.synth.config import GenerateSettings
from ray_e5.synth.filters import ContaminationFilter, Deduplicator
from ray_e5.synth.plan import brainstorm_requests, expand, plan_slots
from ray_e5.synth.stage import completions, model_name
from ray_e5.synth.store import Store, Tally

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


class GenerateError(ConfigError):
    """The run cannot go on (bad eval paths, a server that refuses the key or model); nothing written is lost."""


class EmptySyntheticError(GenerateError):
    """A non-empty plan ended with no valid row on disk: the next stage would train on nothing synthetic.

    ``ray-e5 generate`` exits non-zero; ``quickstart`` and ``pipeline`` stop unless ``--allow-empty-synthetic``.
    ``manifest`` is the manifest that was written (drop reasons included)."""

    def __init__(self, message: str, manifest: dict | None = None):
        super().__init__(message)
        self.manifest = manifest or {}


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
        self.config = config
        self.deadline = self.started + self.settings.time_budget_s if self.settings.time_budget_s else None
        self.tally = Tally()
        # Refuse bad evaluation paths before any request.
        try:
            self.contamination = ContaminationFilter(self.settings.contamination_paths,
                                                     self.settings.contamination_ngram)
        except FileNotFoundError as err:
            raise GenerateError(str(err)) from None
        self.store = Store(runs.join(config.run_dir, "synthetic"))
        self.previous = self.store.load_manifest()
        self.dedup = Deduplicator(self.settings.near_duplicate_threshold)
        self.written_ids: set[str] = set()
        for row in self.store.scan():
            self.written_ids.add(row["id"])
            self.tally.add_row(row)
            self.dedup.check(row)
        self.shards = [p.rsplit("/", 1)[-1] for p in self.store.shard_paths()]
        self.brainstorm_info: dict[str, Any] = {}
        self.pending = 0

    # ---- brainstorm ----------------------------------------------------------------------------------------
    def brainstorm(self, slots, request_kwargs) -> dict[str, list[str]]:
        state = self.store.load_brainstorm()
        wanted = brainstorm_requests(self.settings, slots)
        todo = [r for r in wanted if state.get(r["key"], {}).get("id") != r["id"]]
        failed: list[str] = []
        ok = 0
        if todo:
            bar = _progress(self.settings, len(todo), "brainstorm")
            last_save = time.monotonic()
            for row in completions(todo, "brainstorm", self.settings, **request_kwargs).iter_rows():
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
            by_key = {r["key"]: r for r in wanted}
            for key in sorted(failed):  # freeze a failed group on a sibling's tasks so its examples can go on
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
    def examples(self, slots, tasks, request_kwargs) -> None:
        s = self.settings
        items, waiting = expand(s, slots, tasks)
        pending = [i for i in items if i["id"] not in self.written_ids]
        self.pending = len(pending) + len(waiting)
        if waiting:  # their brainstorm was skipped (time or budget): so are they
            reason = "skipped_budget" if self.tally.brainstorm_drops.get("skipped_budget") else "skipped_time_budget"
            self.tally.drops[reason] += len(waiting)
        if not pending:
            return
        bar = _progress(s, len(pending), "generate")
        buffer: list[dict] = []
        last_flush = time.monotonic()
        ok = 0
        for row in completions(pending, "example", s, **request_kwargs).iter_rows():
            self.tally.requests += 1
            self.tally.add_tokens(row)
            reason = row["drop"] or self.dedup.check(row) or self.contamination.check(row)
            if reason:
                self.tally.drops[reason] += 1
            else:
                ok += 1
                buffer.append(row)
            bar.update(1)
            if len(buffer) >= s.shard_size or (buffer and time.monotonic() - last_flush > s.flush_every_s):
                self._flush(buffer)
                buffer, last_flush = [], time.monotonic()
                bar.set_postfix(written=self.tally.written, dropped=sum(self.tally.drops.values()), refresh=False)
            if ok == 0 and self.tally.requests % 20 == 0:  # a refused key fails fast, not after every request
                _fatal(s, self.tally.drops, ok, "example")
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
        drops = dict(p.get("drops", {}))
        for k, v in t.drops.items():
            drops[k] = drops.get(k, 0) + v
        prompt = p.get("tokens", {}).get("prompt", 0) + t.prompt_tokens
        completion = p.get("tokens", {}).get("completion", 0) + t.completion_tokens
        cost, cost_now = s.cost_usd(prompt, completion), s.cost_usd(t.prompt_tokens, t.completion_tokens)
        return {
            "examples": sum(t.by_kind.values()), "planned": s.num_examples, "written_this_run": t.written,
            "pending_this_run": self.pending, "requests_this_run": t.requests,
            "by_kind": dict(sorted(t.by_kind.items())), "by_language": dict(t.by_language.most_common()),
            "drops": drops, "drops_this_run": dict(t.drops),
            "brainstorm": {**self.brainstorm_info, "drops_this_run": dict(t.brainstorm_drops)},
            "tokens": {"prompt": prompt, "completion": completion},
            "tokens_this_run": {"prompt": t.prompt_tokens, "completion": t.completion_tokens},
            "cost_usd": None if cost is None else round(cost, 6),
            "cost_usd_this_run": None if cost_now is None else round(cost_now, 6),
            "wall_seconds": round(p.get("wall_seconds", 0) + wall, 1), "wall_seconds_this_run": round(wall, 1),
            "completion_tokens_per_s_this_run": round(t.completion_tokens / wall, 2) if wall > 0 else 0.0,
            "backend": s.backend, "model": model_name(s), "shards": list(self.shards),
            "runs": p.get("runs", 0) + 1, "settings": s.model_dump(mode="json"),
        }


def generate(config: RayE5Config) -> dict[str, Any]:
    """Generate ``generate.num_examples`` planned examples into ``<run_dir>/synthetic``; return the manifest."""
    run = _Run(config)  # validates the section and the eval paths, reads what earlier runs wrote
    s = run.settings
    slots = plan_slots(s)
    with ExitStack() as stack:
        from ray_e5.cluster import connect

        ray = connect(config.ray_address)
        stack.enter_context(_ray_data_quiet())
        kwargs: dict[str, Any] = {"deadline": run.deadline}
        if s.backend != "vllm":
            kwargs["base_url"] = s.base_url
            kwargs["api_key"] = _secret(s)
            if s.backend == "llamacpp":
                server = stack.enter_context(LlamaCppServer(s.gguf, n_ctx=s.llamacpp_ctx))
                kwargs["base_url"] = server.base_url
                kwargs["node_id"] = ray.get_runtime_context().get_node_id()
            if s.requests_per_minute or s.tokens_per_minute or s.budget_usd is not None:
                from ray_e5.synth.ledger import Ledger

                spent = run.previous.get("cost_usd") or 0.0
                ledger = ray.remote(Ledger).options(num_cpus=0).remote(
                    s.requests_per_minute, s.tokens_per_minute, s.budget_usd, s.price(), spent)
                kwargs["ledger"] = ledger
                stack.callback(ray.kill, ledger)
        tasks = run.brainstorm(slots, kwargs)
        run.examples(slots, tasks, kwargs)
    manifest = run.manifest()
    run.store.save_manifest(manifest)
    return manifest

