"""Generation through the OpenAI Batch API (``generate.batch_api: true``, backends ``openai`` and ``azure``): half
the price of synchronous calls, answers within 24 hours, and a driver that may go away at any time.

For each phase (brainstorm, then examples) the planned requests are streamed into Batch API JSONL files in parts of
at most ``batch_max_requests`` lines and ``batch_max_bytes`` bytes (a local temporary file each: the plan is never
held twice in memory), uploaded (``files.create(purpose="batch")``), submitted (``batches.create``) and polled with
a growing interval and a progress bar. The output and error files are streamed back line by line and every answer
goes through the same validators as a synchronous one (:func:`ray_e5.generate.completions.finish`); ``custom_id`` is our
content-addressed request id.

Resume by batch id: ``<run_dir>/synthetic/batches.json`` records every part as soon as it exists (``prepared``,
then its file id, then its batch id and the batch's state) and ``synthetic/batches/<part>.ids`` the request ids it
holds. A rerun into the same run dir (the journal says which requests were answered) takes each request still
wanted to the latest part that holds it:

- a part whose batch is in flight is polled again (re-attached), never resubmitted;
- a part uploaded whose batch id was lost with the driver is found again by its input file (``batches.list``);
- a finished part's output file is downloaded again for answers the journal had not received;
- only lines that failed or expired (and error lines with a transient status: 429, 5xx) are resubmitted, at most
  ``batch_resubmits`` times per run; lines that got an answer, valid or not, are never sent again.

Cost: ``GenerateSettings.cost_usd`` charges the Batch API's discount (``batch_discount``, 50%) from the price table;
each line reserves its worst case (estimated prompt tokens + ``max_tokens``) before it is written, and ``budget_usd``
refuses the lines that would go over (``skipped_budget``, never uploaded); the real cost comes from each answer's
usage. ``ray-e5 generate --status`` prints the parts, their batches' states and counts, and submits nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from ray_e5.rundir import RunDir
from ray_e5 import storage
from ray_e5.generate.backends import Completion, envelope_answer, is_transient, response_format
from ray_e5.generate.config import GenerateSettings
from ray_e5.generate.errors import GenerateError
from ray_e5.generate.parse import Dropped
from ray_e5.generate.completions import estimate_tokens, finish

REGISTRY = "batches.json"
IDS_DIR = "batches"
LIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
# Error codes of lines that never ran: sent again (they were not billed).
NOT_RUN = ("batch_expired", "batch_cancelled")
TRANSFER_TIMEOUT_S = 600.0  # uploads and downloads of up to 200 MB


def _say(message: str) -> None:
    print(f"[ray-e5 generate] {message}", flush=True)


def endpoint(settings: GenerateSettings) -> str:
    """The batch endpoint (and each line's url): Azure's deployments take it without the version prefix."""
    return "/chat/completions" if settings.backend == "azure" else "/v1/chat/completions"


def make_client(settings: GenerateSettings):
    """The sync openai client (on the driver) with the key read from the environment; its own retries."""
    import openai

    key = os.environ.get(settings.key_env() or "") or "EMPTY"
    common = dict(api_key=key, max_retries=settings.max_retries, timeout=settings.request_timeout_s)
    if settings.backend == "azure":
        return openai.AzureOpenAI(azure_endpoint=settings.base_url, api_version=settings.azure_api_version, **common)
    return openai.OpenAI(base_url=settings.base_url, **common)


def request_line(item: dict, settings: GenerateSettings) -> bytes:
    """One planned request as a Batch API input line (the same body ChatBackend sends synchronously)."""
    body: dict[str, Any] = {"model": settings.model, "messages": [{"role": "user", "content": item["prompt"]}],
                            "max_tokens": int(item["max_tokens"]), "temperature": settings.temperature,
                            "top_p": settings.top_p}
    fmt = response_format(settings.response_format_style(), json.loads(item["schema"]))
    if fmt:
        body["response_format"] = fmt
    line = {"custom_id": item["id"], "method": "POST", "url": endpoint(settings), "body": body}
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def worst_cost(item: dict, settings: GenerateSettings) -> float:
    return settings.cost_usd(estimate_tokens(item["prompt"]), int(item["max_tokens"])) or 0.0


def completion_of(record: dict) -> Completion | Dropped:
    """An output or error file line as the outcome of its request; the body is read as the synchronous path reads a
    response (:func:`ray_e5.generate.backends.envelope_answer`), so a malformed one is ``request_bad_response``
    and usage it cannot read is charged at the reservation."""
    response = record.get("response") if isinstance(record.get("response"), dict) else {}
    error = record.get("error") if isinstance(record.get("error"), dict) else {}
    status = response.get("status_code")
    code = error.get("code")
    if isinstance(code, str) and code in NOT_RUN:
        return Dropped("skipped_" + code)
    if isinstance(status, int) and not isinstance(status, bool) and status != 200:
        return Dropped(f"request_http_{status}" if 100 <= status <= 599 else "request_bad_response")
    body = response.get("body")
    if not isinstance(body, dict):
        return Dropped("request_bad_response")  # a 200 whose body is not a chat completion, as synchronously
    try:
        return Completion(*envelope_answer(body.get("choices"), body.get("usage")))
    except Dropped as drop:
        return drop


def update_part(part: dict, batch) -> bool:
    """Record a Batch object's id, state, counts and files in its part; True when something changed."""
    counts = batch.request_counts
    new = {"batch_id": batch.id, "status": batch.status,
           "counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
           if counts is not None else part.get("counts", {}),
           "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id}
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    if errors:  # codes only: a message could quote a line of ours
        new["errors"] = sorted({str(e.code) for e in errors if getattr(e, "code", None)})
    changed = any(part.get(k) != v for k, v in new.items())
    part.update(new, updated_at=round(time.time(), 3))
    return changed


class Registry:
    """``synthetic/batches.json`` (every part, its file and batch ids and state) and ``synthetic/batches/*.ids``."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.uri = storage.join(out_dir, REGISTRY)
        self.parts: list[dict] = []
        if storage.exists(self.uri):
            try:
                self.parts = list(storage.read_json(self.uri)["parts"])
                assert all(isinstance(p, dict) and {"name", "phase", "status"} <= set(p) for p in self.parts)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise GenerateError(f"generate: {self.uri} is not a batch registry this version wrote. It records the "
                                    "batches in flight: restore it, or move it away to start over (batches still "
                                    "in flight would then be submitted and paid again)") from None

    def save(self) -> None:
        text = json.dumps({"parts": self.parts}, indent=1, sort_keys=True) + "\n"
        if storage.is_local(self.uri):  # atomic: a kill mid-write never leaves half a registry
            path = storage.resolve(self.uri)[1]
            with open(path + ".tmp", "w") as out:
                out.write(text)
            os.replace(path + ".tmp", path)
        else:
            storage.write_text(self.uri, text)

    def ids_uri(self, name: str) -> str:
        return storage.join(self.out_dir, IDS_DIR, f"{name}.ids")

    def ids(self, part: dict) -> list[str]:
        uri = self.ids_uri(part["name"])
        return storage.read_text(uri).split() if storage.exists(uri) else []

    def add(self, part: dict, ids: list[str]) -> None:
        storage.write_text(self.ids_uri(part["name"]), "\n".join(ids) + "\n")
        self.parts.append(part)
        self.save()

    def next_name(self, phase: str) -> str:
        return f"{phase}-{len(self.parts):05d}"


class _PartWriter:
    """One Batch API input file being written line by line to a local temporary file."""

    def __init__(self, path: str):
        self.path = path
        self.handle = open(path, "wb")
        self.ids: list[str] = []
        self.bytes = 0
        self.reserved = 0.0

    def add(self, request_id: str, line: bytes, cost: float) -> None:
        self.handle.write(line)
        self.ids.append(request_id)
        self.bytes += len(line)
        self.reserved += cost

    def close(self) -> None:
        self.handle.close()


class BatchPhase:
    """The requests of one phase through the Batch API: attach, submit, poll, collect (see the module doc)."""

    def __init__(self, settings: GenerateSettings, out_dir: str, phase: str, spent_usd: float = 0.0, client=None):
        self.settings, self.out_dir, self.phase = settings, out_dir, phase
        self.client = client or make_client(settings)
        self.registry = Registry(out_dir)
        self.spent = spent_usd  # what the run dir already paid (the journal), plus what this phase receives
        self.reserved: dict[str, float] = {}  # part name -> worst case still outstanding
        self.mine: set[str] = set()  # parts created by this run
        self.members: dict[str, list[str]] = {}  # part name -> the wanted ids it answers for
        self.tmp = tempfile.mkdtemp(prefix="ray-e5-batch-")
        self.refused_budget = 0
        self.bar = None

    # ---- budget ------------------------------------------------------------------------------------------------
    def _committed(self) -> float:
        return self.spent + sum(self.reserved.values())

    def _fits(self, cost: float, pending: float) -> bool:
        budget = self.settings.budget_usd
        return budget is None or self._committed() + pending + cost <= budget * (1 + 1e-9)

    # ---- the API ---------------------------------------------------------------------------------------------
    def _api(self, what: str, fn, *args, **kwargs):
        """Call the API; a refusal becomes a GenerateError that says what to do (never with the server's text)."""
        with self._guard(what):
            return fn(*args, **kwargs)

    @contextmanager
    def _guard(self, what: str):
        import openai

        try:
            yield
        except openai.APIStatusError as err:
            code = err.status_code
            hint = {401: f"the API key in ${self.settings.key_env()} was refused",
                    403: f"the API key in ${self.settings.key_env()} has no access to the Batch API or this model",
                    404: f"not found (is generate.base_url {self.settings.base_url!r} right, and the key of the "
                         f"project that submitted the batches in synthetic/{REGISTRY}?)",
                    413: "the file is too large: lower generate.batch_max_bytes (or batch_max_requests)",
                    429: "the organisation's batch queue is full (its enqueued-token limit) or the rate limit was "
                         "hit: rerun later (recorded parts are picked up), or lower generate.batch_max_requests"}.get(
                        code, "see the provider's Batch API limits")
            raise GenerateError(f"generate: the Batch API refused to {what} with HTTP {code}: {hint}. Nothing was "
                                f"lost: batches in flight are in synthetic/{REGISTRY}; a rerun re-attaches") from None
        except openai.APIConnectionError:
            where = self.settings.base_url or "api.openai.com"
            raise GenerateError(f"generate: could not {what}: the Batch API at {where} did not answer after the "
                                "client's retries. Nothing was lost: a rerun re-attaches to the batches in "
                                "flight") from None

    def _find_batch(self, part: dict):
        """The batch created from this part's file by a driver that died before it could record it, or None."""
        since = part.get("created_at", 0) - 3600
        for batch in self._api("list batches", self.client.batches.list, limit=100):
            if batch.input_file_id == part["file_id"]:
                return batch
            if batch.created_at < since:  # newest first: nothing older can be ours
                return None
        return None

    def _create(self, part: dict) -> None:
        batch = self._api(f"create the batch of {part['name']}", self.client.batches.create,
                          input_file_id=part["file_id"], endpoint=endpoint(self.settings), completion_window="24h",
                          metadata={"ray_e5_part": part["name"]})
        update_part(part, batch)
        self.registry.save()
        _say(f"batch {batch.id}: {part['name']}, {part['requests']} requests, {part['bytes'] / 1e6:.1f} MB"
             + (f", worst case ${part['reserved_usd']:.4f}" if self.settings.budget_usd is not None else ""))

    # ---- submit ----------------------------------------------------------------------------------------------
    def _launch(self, writer: _PartWriter, attempt: int) -> dict:
        writer.close()
        part = {"name": self.registry.next_name(self.phase), "phase": self.phase, "status": "prepared",
                "requests": len(writer.ids), "bytes": writer.bytes, "reserved_usd": round(writer.reserved, 6),
                "attempt": attempt, "created_at": round(time.time(), 3)}
        self.registry.add(part, writer.ids)  # recorded before the upload: a kill from here on loses nothing
        self.mine.add(part["name"])
        self.members[part["name"]] = writer.ids
        self.reserved[part["name"]] = writer.reserved
        try:
            with open(writer.path, "rb") as handle:
                uploaded = self._api(f"upload {part['name']} ({writer.bytes} bytes, {len(writer.ids)} requests)",
                                     self.client.files.create, file=(f"{part['name']}.jsonl", handle),
                                     purpose="batch", timeout=TRANSFER_TIMEOUT_S)
        except GenerateError:
            part["status"] = "refused"
            self.reserved.pop(part["name"], None)
            self.registry.save()
            raise
        finally:
            os.unlink(writer.path)
        part.update(file_id=uploaded.id, status="uploaded")
        self.registry.save()
        self._create(part)
        return part

    def _submit(self, items: Iterable[dict], attempt: int) -> Iterator[dict]:
        """Write ``items`` into parts, upload and submit each as soon as it is full; yields the rows of requests
        that cannot be sent (over the budget, or one line over the byte limit)."""
        s = self.settings
        writer: _PartWriter | None = None
        over_budget = 0
        for item in items:
            line, cost = request_line(item, s), worst_cost(item, s)
            if len(line) > s.batch_max_bytes:
                yield finish(self.phase, item, Dropped("request_too_large"), s)
                continue
            if writer is not None and (len(writer.ids) >= s.batch_max_requests
                                       or writer.bytes + len(line) > s.batch_max_bytes):
                self._launch(writer, attempt)
                writer = None
            if not self._fits(cost, writer.reserved if writer is not None else 0.0):
                over_budget += 1
                yield finish(self.phase, item, Dropped("skipped_budget"), s)
                continue
            if writer is None:
                writer = _PartWriter(os.path.join(self.tmp, f"part-{len(self.registry.parts)}.jsonl"))
            writer.add(item["id"], line, cost)
        if writer is not None:
            if writer.ids:
                self._launch(writer, attempt)
            else:
                writer.close()
        if over_budget:
            self.refused_budget += over_budget
            _say(f"budget_usd ${s.budget_usd:g}: {over_budget} {self.phase} requests not submitted (their worst case "
                 f"would go over; ${self._committed():.4f} spent or reserved)")

    # ---- collect ---------------------------------------------------------------------------------------------
    def _records(self, file_id: str | None) -> Iterator[dict]:
        """The lines of an output or error file, streamed; a line that is not JSON (or JSON nested too deep or
        with a number Python refuses) is skipped: its request is then missing from the file and handled as such."""
        if not file_id:
            return
        with self._guard(f"download {file_id}"), self.client.files.with_streaming_response.content(
                file_id, timeout=TRANSFER_TIMEOUT_S) as response:
            for line in response.iter_lines():
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):  # JSONDecodeError, a huge integer, too deep a nesting
                    continue
                if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
                    yield record

    def _collect(self, part: dict, items: dict[str, dict], again: list[dict]) -> Iterator[dict]:
        """The rows of a finished part; its lines that never ran (or failed transiently) go to ``again``."""
        members = set(self.members.get(part["name"], ()))
        seen: set[str] = set()
        cost = 0.0
        for file_id in (part.get("output_file_id"), part.get("error_file_id")):
            for record in self._records(file_id):
                rid = record["custom_id"]
                if rid not in members or rid in seen:
                    continue
                seen.add(rid)
                result = completion_of(record)
                if isinstance(result, Dropped) and (result.reason.startswith("skipped_") or is_transient(result.reason)):
                    again.append(items[rid])
                    continue
                row = finish(self.phase, items[rid], result, self.settings)
                cost += self.settings.cost_usd(row["prompt_tokens"], row["completion_tokens"]) or 0.0
                yield row
        missing = [rid for rid in self.members.get(part["name"], ()) if rid not in seen]
        for rid in missing:
            if part["status"] == "completed":  # answered (and billed) but its line came back unreadable
                yield finish(self.phase, items[rid], Dropped("request_bad_response"), self.settings)
            else:  # failed, expired or cancelled: it never ran
                again.append(items[rid])
        self.spent += cost
        self.reserved.pop(part["name"], None)
        part["collected_at"] = round(time.time(), 3)
        self.registry.save()

    def _resubmit(self, parent: dict, again: list[dict]) -> Iterator[dict]:
        """Lines of a finished part that never ran: sent again, or, past ``batch_resubmits``, left for a rerun."""
        if not again:
            return
        attempt = parent.get("attempt", 0) + 1 if parent["name"] in self.mine else 0
        if attempt > self.settings.batch_resubmits:
            reason = "skipped_batch_" + {"failed": "failed", "expired": "expired"}.get(parent["status"], "error")
            _say(f"{parent['name']} ({parent['status']}): {len(again)} requests left for a rerun after "
                 f"{self.settings.batch_resubmits} resubmission(s)")
            for item in again:
                yield finish(self.phase, item, Dropped(reason), self.settings)
            return
        _say(f"{parent['name']} ({parent['status']}): resubmitting {len(again)} requests that failed or did not run")
        yield from self._submit(again, attempt)

    # ---- the phase -------------------------------------------------------------------------------------------
    def _attach(self, wanted: dict[str, dict]) -> list[dict]:
        """Every recorded part that is the latest to hold a wanted request; the others wanted go to ``fresh``."""
        owner: dict[str, str] = {}
        for part in self.registry.parts:
            if part.get("phase") == self.phase:
                for rid in self.registry.ids(part):
                    if rid in wanted:
                        owner[rid] = part["name"]
        for rid, name in owner.items():
            self.members.setdefault(name, []).append(rid)
        attached = []
        for part in self.registry.parts:
            if part["name"] not in self.members:
                continue
            if part["status"] == "prepared" or part["status"] == "refused":  # never uploaded (or refused)
                part["status"] = "abandoned" if part["status"] == "prepared" else part["status"]
                del self.members[part["name"]]
                continue
            if part["status"] == "uploaded":  # the driver died between upload and batch id
                batch = self._find_batch(part)
                if batch is not None:
                    update_part(part, batch)
                    _say(f"found batch {batch.id} of {part['name']} by its input file")
                else:
                    self._create(part)
            self.reserved[part["name"]] = part.get("reserved_usd", 0.0) * len(self.members[part["name"]]) / max(
                1, part.get("requests", 1))
            attached.append(part)
        self.registry.save()
        if attached:
            states = Counter(p["status"] for p in attached)
            _say(f"{self.phase}: re-attached to {len(attached)} recorded batch(es) ("
                 + ", ".join(f"{k} x{v}" for k, v in sorted(states.items())) + ")")
        return attached

    def rows(self, items: list[dict]) -> Iterator[dict]:
        """One output row per planned request (as the synchronous path yields them)."""
        from tqdm.auto import tqdm

        wanted = {item["id"]: item for item in items}
        try:
            live = self._attach(wanted)
            held = {rid for name in self.members for rid in self.members[name]}
            fresh = (item for item in items if item["id"] not in held)
            yield from self._submit(fresh, 0)
            live = [p for p in self.registry.parts if p["name"] in self.members]
            self.bar = tqdm(total=sum(len(self.members[p["name"]]) for p in live), desc=f"batch {self.phase}",
                            unit="req", disable=not self.settings.progress, mininterval=1.0, dynamic_ncols=True)
            interval = self.settings.batch_poll_s
            done = 0
            first = True
            while live:
                if not first:
                    time.sleep(interval)
                    interval = min(interval * 1.5, self.settings.batch_poll_max_s)
                first = False
                changed = False
                running = 0
                for part in list(live):
                    if part["status"] not in TERMINAL:
                        batch = self._api(f"poll batch {part['batch_id']}", self.client.batches.retrieve,
                                          part["batch_id"])
                        changed |= update_part(part, batch)
                    if part["status"] in TERMINAL:
                        live.remove(part)
                        again: list[dict] = []
                        yield from self._collect(part, wanted, again)
                        done += len(self.members[part["name"]])
                        before = set(self.members)
                        yield from self._resubmit(part, again)
                        for name in set(self.members) - before:
                            new = next(p for p in self.registry.parts if p["name"] == name)
                            live.append(new)
                            self.bar.total += len(self.members[name])
                        changed = True
                    else:
                        counts = part.get("counts") or {}
                        running += min(len(self.members[part["name"]]),
                                       int(counts.get("completed", 0)) + int(counts.get("failed", 0)))
                if changed:
                    self.registry.save()
                self.bar.n = done + running
                self.bar.set_postfix(refresh=False, **Counter(p["status"] for p in live))
                self.bar.refresh()
        finally:
            if self.bar is not None:
                self.bar.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def batch_rows(items: list[dict], phase: str, settings: GenerateSettings, out_dir: str,
               spent_usd: float = 0.0) -> Iterator[dict]:
    """The output rows of ``items`` through the Batch API (``generate.batch_api``); see the module doc."""
    yield from BatchPhase(settings, out_dir, phase, spent_usd).rows(items)


# ---- ray-e5 generate --status ---------------------------------------------------------------------------------
def status(config) -> list[dict]:
    """Print the recorded parts, their batches' state and counts (asked of the API when the key is set); submits
    nothing and writes nothing. Returns the parts as printed."""
    settings = config.section("generate", GenerateSettings)
    out_dir = RunDir.of(config.run_dir).synthetic
    registry = Registry(out_dir)
    if not registry.parts:
        print(f"no Batch API batches recorded in {storage.join(out_dir, REGISTRY)}")
        return []
    client = None
    source = "as recorded"
    if settings.backend in ("openai", "azure") and os.environ.get(settings.key_env() or ""):
        client, source = make_client(settings), "from the API"
    header = f"{'part':<18} {'batch':<34} {'status':<12} {'total':>7} {'done':>7} {'failed':>7}  attempt"
    print(f"batches in {storage.join(out_dir, REGISTRY)} ({source}):")
    print(header)
    totals: Counter = Counter()
    for part in registry.parts:
        if client is not None and part.get("batch_id"):
            try:
                update_part(part, client.batches.retrieve(part["batch_id"]))
            except Exception as err:  # one unreachable batch does not hide the others
                part["status"] = f"{part['status']}?"
                part["note"] = type(err).__name__
        counts = part.get("counts") or {}
        totals[part["status"]] += 1
        print(f"{part['name']:<18} {part.get('batch_id') or '-':<34} {part['status']:<12} "
              f"{counts.get('total', part.get('requests', 0)):>7} {counts.get('completed', 0):>7} "
              f"{counts.get('failed', 0):>7}  {part.get('attempt', 0)}")
    print("total: " + ", ".join(f"{k} x{v}" for k, v in sorted(totals.items())))
    return registry.parts
