"""The generation pipeline: plan -> brainstorm -> generate (Ray Data, autoscaling actor pool) -> parse and validate
-> exact and near-duplicate removal -> contamination filter -> Parquet shards + manifest.json.

Every planned example has a content-addressed id (a hash of its kind, task, language, placeholders and seed slot):
a rerun into the same run directory skips ids already written, so a killed run continues without duplicate rows
and without repeating a request for work already on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from typing import Any

import numpy as np

from ray_e5 import runs
from ray_e5.config import RayE5Config
from ray_e5.synth.backends import ChatBackend, LlamaCppServer, cost_usd
from ray_e5.synth.config import GenerateSettings
from ray_e5.synth.filters import ContaminationFilter, Deduplicator
from ray_e5.synth.parse import Dropped, parse_json, parse_tasks, validate_answer
from ray_e5.synth.prompts import BRAINSTORM_SCHEMA, answer_schema, brainstorm_prompt, example_prompt
from ray_e5.synth.taxonomy import HIGH, KINDS, language_weights, sample_placeholders, to_row

FALLBACK_TASKS = {
    "short-long": ["Given a web search query, retrieve relevant passages that answer the query.",
                   "Given a question about a product, retrieve user reviews that answer it."],
    "long-short": ["Classify a customer review as positive, negative or neutral.",
                   "Identify the topic of a news article."],
    "short-short": ["Given a short question, retrieve a short answer that matches it.",
                    "Retrieve the title of a scientific paper given a short summary of its finding."],
    "long-long": ["Given a long news article, retrieve another article about the same event.",
                  "Given a scientific abstract, retrieve abstracts that build on the same method."],
}
COLUMNS = ("id", "task", "kind", "language", "query", "positive", "negative", "backend", "model", "prompt_id",
           "prompt_tokens", "completion_tokens")


def _id(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---- planning ------------------------------------------------------------------------------------------------
def brainstorm(settings: GenerateSettings, backend: ChatBackend | None, out_dir: str, drops: Counter) -> dict[str, list[str]]:
    """Task definitions per asymmetric kind: read from brainstorm.json when a run already made them."""
    path = runs.join(out_dir, "brainstorm.json")
    if runs.exists(path):
        return runs.read_json(path)
    tasks: dict[str, list[str]] = {}
    kinds = [k for k, w in settings.mix.items() if w > 0 and KINDS[k].brainstorm]

    async def one(kind: str) -> list[str]:
        try:
            answer = await backend.complete(brainstorm_prompt(kind, settings.tasks_per_brainstorm), BRAINSTORM_SCHEMA)
            found = parse_tasks(answer.text)
        except Dropped as drop:
            drops[f"brainstorm_{drop.reason}"] += 1
            found = []
        if not found:
            drops["brainstorm_fallback"] += 1
        return found or FALLBACK_TASKS[kind]

    if kinds and backend is not None:
        loop = asyncio.new_event_loop()
        try:
            async def all_kinds():
                return await asyncio.gather(*(one(k) for k in kinds))

            results = loop.run_until_complete(all_kinds())
        finally:
            loop.close()
        tasks = dict(zip(kinds, results))
    else:
        tasks = {k: FALLBACK_TASKS[k] for k in kinds}
    runs.write_json(path, tasks)
    return tasks


def plan(settings: GenerateSettings, tasks: dict[str, list[str]]) -> list[dict]:
    """Seeded placeholder sampling: the same settings always plan the same examples with the same ids."""
    rng = random.Random(settings.seed)
    kinds = [k for k, w in settings.mix.items() if w > 0]
    kind_weights = [settings.mix[k] for k in kinds]
    weights = language_weights(settings.english_share)
    if settings.languages:
        weights = {c: weights[c] for c in settings.languages}
    langs, lang_w = list(weights), list(weights.values())
    items = []
    for slot in range(settings.num_examples):
        kind = KINDS[rng.choices(kinds, kind_weights)[0]]
        language = rng.choices(langs, lang_w)[0]
        task = kind.fixed_task or rng.choice(tasks.get(kind.name) or FALLBACK_TASKS[kind.name])
        values = sample_placeholders(kind, rng)
        tgt = None
        if kind.name == "bitext":
            tgt = "en" if language != "en" else rng.choice(HIGH)
        prompt = example_prompt(kind, task, language, values, tgt)
        items.append({"id": _id(settings.seed, slot, kind.name, task, language, tgt, values), "kind": kind.name,
                      "task": task, "language": language, "tgt_language": tgt or "", "prompt": prompt,
                      "prompt_id": f"{kind.name}/v1", "schema": json.dumps(answer_schema(kind.output_keys))})
    return items


# ---- generation (one actor of the pool) ----------------------------------------------------------------------
class Generator:
    """Sends a batch of planned prompts with bounded concurrency; returns one row per prompt (``drop`` says why
    a row is not an example)."""

    def __init__(self, settings: GenerateSettings, base_url: str | None, deadline: float | None):
        self.settings, self.deadline = settings, deadline
        self.backend = ChatBackend(settings, base_url)
        self.loop = asyncio.new_event_loop()
        self.spent = 0.0

    async def _one(self, item: dict, gate: asyncio.Semaphore) -> dict:
        s = self.settings
        out = {k: item[k] for k in ("id", "kind", "task", "language", "prompt_id")}
        out.update(query="", positive="", negative="", backend=s.backend, model=s.model, prompt_tokens=0,
                   completion_tokens=0, drop="")
        async with gate:
            if self.deadline is not None and time.time() > self.deadline:
                return {**out, "drop": "skipped_time_budget"}
            if s.budget_usd is not None and self.spent >= s.budget_usd:
                return {**out, "drop": "skipped_budget"}
            try:
                answer = await self.backend.complete(item["prompt"], json.loads(item["schema"]))
            except Dropped as drop:
                return {**out, "drop": drop.reason}
        self.spent += cost_usd(s.model, answer.prompt_tokens, answer.completion_tokens)
        out.update(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)
        kind = KINDS[item["kind"]]
        try:
            fields = validate_answer(parse_json(answer.text), kind, s.min_chars, s.max_chars)
        except Dropped as drop:
            return {**out, "drop": drop.reason}
        row = to_row(kind, fields, item["task"], item["language"], item["tgt_language"] or None)
        return {**out, **row}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        items = [dict(zip(batch, values)) for values in zip(*batch.values())]

        async def run_all():
            gate = asyncio.Semaphore(self.settings.concurrency)
            return await asyncio.gather(*(self._one(item, gate) for item in items))

        rows = self.loop.run_until_complete(run_all())
        return {key: [r[key] for r in rows] for key in (*COLUMNS, "drop")}


# ---- the stage -----------------------------------------------------------------------------------------------
def _written(out_dir: str) -> tuple[set[str], list[str]]:
    import pyarrow.parquet as pq

    fs, path = runs.resolve(out_dir)
    from pyarrow import fs as pafs

    files = [f.path for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
             if f.path.endswith(".parquet")]
    ids: set[str] = set()
    for f in files:
        ids.update(pq.read_table(f, columns=["id"], filesystem=fs).column("id").to_pylist())
    return ids, sorted(files)


def _write_shard(out_dir: str, rows: list[dict], index: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{k: r[k] for k in COLUMNS} for r in rows])
    name = f"part-{int(time.time())}-{index:05d}.parquet"
    fs, path = runs.resolve(runs.join(out_dir, name))
    pq.write_table(table, path, filesystem=fs)
    return name


def generate(config: RayE5Config) -> dict[str, Any]:
    """Generate ``generate.num_examples`` planned examples into ``<run_dir>/synthetic``; return the manifest."""
    started = time.time()
    settings = config.section("generate", GenerateSettings)
    out_dir = runs.join(config.run_dir, "synthetic")
    runs.makedirs(out_dir)
    manifest_path = runs.join(out_dir, "manifest.json")
    previous = runs.read_json(manifest_path) if runs.exists(manifest_path) else {}
    deadline = started + settings.time_budget_s if settings.time_budget_s else None
    done_ids, files = _written(out_dir)
    drops: Counter = Counter()
    tokens = Counter()
    written = 0

    from contextlib import ExitStack

    with ExitStack() as stack:
        base_url = settings.base_url
        backend = None
        if settings.backend == "vllm":
            raise NotImplementedError("the vLLM backend runs through ray.data.llm on GPU nodes: "
                                      "see ray_e5.synth.backends.vllm_processor_config")
        if settings.backend == "llamacpp":
            base_url = stack.enter_context(LlamaCppServer()).base_url
        backend = ChatBackend(settings, base_url)
        tasks = brainstorm(settings, backend, out_dir, drops)
        pending = [item for item in plan(settings, tasks) if item["id"] not in done_ids]

        dedup = Deduplicator(settings.near_duplicate_threshold)
        dedup.seed_from(out_dir)
        contamination = ContaminationFilter(settings.contamination_paths, settings.contamination_ngram)
        buffer: list[dict] = []
        shard_index = 0
        if pending:
            from ray_e5.cluster import connect

            ray = connect(config.ray_address)
            ds = ray.data.from_items(pending).map_batches(
                Generator, fn_constructor_kwargs={"settings": settings, "base_url": base_url, "deadline": deadline},
                batch_size=max(1, settings.concurrency * 8), concurrency=(1, settings.actors), num_cpus=0.5)
            for batch in ds.iter_rows():
                tokens["prompt"] += int(batch["prompt_tokens"])
                tokens["completion"] += int(batch["completion_tokens"])
                reason = batch["drop"] or dedup.check(batch) or contamination.check(batch)
                if reason:
                    drops[reason] += 1
                    continue
                buffer.append(batch)
                if len(buffer) >= settings.shard_size:
                    files.append(_write_shard(out_dir, buffer, shard_index))
                    written, buffer, shard_index = written + len(buffer), [], shard_index + 1
            if buffer:
                files.append(_write_shard(out_dir, buffer, shard_index))
                written += len(buffer)

    manifest = _manifest(out_dir, settings, previous, drops, tokens, written, time.time() - started)
    runs.write_json(manifest_path, manifest)
    return manifest


def _manifest(out_dir: str, settings: GenerateSettings, previous: dict, drops: Counter, tokens: Counter,
              written: int, wall: float) -> dict[str, Any]:
    import pyarrow.parquet as pq

    fs, _ = runs.resolve(out_dir)
    _, files = _written(out_dir)
    by_kind, by_language = Counter(), Counter()
    for f in files:
        table = pq.read_table(f, columns=["kind", "language"], filesystem=fs)
        by_kind.update(table.column("kind").to_pylist())
        by_language.update(table.column("language").to_pylist())
    all_drops = Counter(previous.get("drops", {}))
    all_drops.update(drops)
    prompt = previous.get("tokens", {}).get("prompt", 0) + tokens["prompt"]
    completion = previous.get("tokens", {}).get("completion", 0) + tokens["completion"]
    return {"examples": sum(by_kind.values()), "written_this_run": written, "by_kind": dict(by_kind),
            "by_language": dict(by_language), "drops": dict(all_drops), "drops_this_run": dict(drops),
            "tokens": {"prompt": prompt, "completion": completion},
            "cost_usd": round(cost_usd(settings.model, prompt, completion), 6),
            "wall_seconds": round(previous.get("wall_seconds", 0) + wall, 1), "backend": settings.backend,
            "model": settings.model, "shards": [f.rsplit("/", 1)[-1] for f in files], "runs": previous.get("runs", 0) + 1}
