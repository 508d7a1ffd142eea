"""A small local OpenAI-compatible chat server that stands in for hosted APIs in tests and benchmarks.

It answers /v1/chat/completions with a JSON object that fills the requested JSON schema's keys with distinct text
(about 320 words per field when the prompt asks for 300 words or more), after a fixed latency and through K
concurrent slots (so its capacity is exactly K / latency requests per second). Faults come from a repeating
schedule, one entry per request: ``ok``, ``429`` (with Retry-After), ``500``, ``timeout`` (sleeps past the
client's timeout), ``malformed``, ``truncated``, ``wrong_keys``, ``empty``, ``prose``, ``bad_body`` (a 200 that is
not JSON), ``cut`` (truncated JSON with finish_reason "length"), ``401`` (refuses the key, echoing it), and the
hostile answers of :data:`HOSTILE` (``hostile`` takes the next of them in turn; each is a fault name too): answers
nested 100000 deep, 5000-digit integers, lone surrogates, NUL bytes, 2 MB fields, NaN, objects where text belongs,
bodies that are not chat completions, bytes that are not UTF-8, and usage counts that are strings, null, negative,
fractional or NaN (with a good answer). It records every call (time, mode, prompt,
Authorization header, the client's request id header, the status and tokens it answered with) for tests to inspect:
``answered`` calls are the ones a hosted API would bill.

It also serves the Batch API: ``/v1/files`` (upload, retrieve, content) and ``/v1/batches`` (create, retrieve,
list, cancel). A batch moves one step each time it is retrieved (``validating``, then ``in_progress`` for
``batch_polls`` polls), then ends as the next entry of a repeating ``batch_faults`` schedule says: ``complete``,
``fail`` (the whole batch, nothing answered), ``expire`` (the first half answered, the rest in the error file as
``batch_expired``), ``errors`` (every third line in the error file with a 500), ``malformed`` (every fourth output
line is not JSON). Each line is answered as a chat completion would be (the ``faults`` schedule applies to lines
too). Uploads over ``max_file_bytes`` are refused with a 413. ``batch_lines`` records every (batch id, custom_id)
submitted; answered lines are ``calls`` too (mode ``batch``). With ``deterministic=True`` an answer depends only
on the request id (the request id header, or the line's custom_id), so the synchronous and the batch path get the
same answers.

In-process: ``with TestServer(faults=[...], latency_s=0.5, slots=16) as server: server.base_url``.
Standalone: ``python -m ray_e5.testing.openai_server --port 8011 --latency 0.2 --slots 8 --faults ok,429,prose``
(``--batch-faults complete,expire --batch-polls 3 --max-file-bytes N --deterministic`` for the Batch API).
"""

# (no `from __future__ import annotations`: FastAPI must see the real `Request` annotation)

import argparse
import asyncio
import hashlib
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass

FAULTS = ("429", "500", "timeout", "malformed", "truncated", "wrong_keys", "empty", "prose")
# Hostile answers (all with status 200), by the drop reason a client of ours must count them under ("" = a valid row:
# a good answer whose usage counts are unreadable).
HOSTILE = {"deep": "nested_too_deep", "huge_int": "huge_number", "surrogate": "unencodable_text",
           "nul": "control_characters", "huge_field": "answer_too_large", "nan": "non_finite_number",
           "object_field": "wrong_type", "no_choices": "request_bad_response", "bad_message": "request_bad_response",
           "deep_body": "request_bad_response", "bad_bytes": "request_bad_response", "bad_usage": ""}
DEPTH = 100_000
BATCH_FAULTS = ("complete", "fail", "expire", "errors", "malformed")


@dataclass
class Call:
    at: float
    mode: str
    prompt: str
    authorization: str
    request_id: str = ""
    status: int = 0  # 0 while in flight (or when the client gave up first)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def answered(self) -> bool:
        return self.status == 200


def _fill(schema: dict | None, n: int, long: bool) -> dict:
    keys = list((schema or {}).get("properties", {})) or ["text"]
    if keys == ["tasks"]:
        return {"tasks": [f"Retrieve documents about subject {n}-{i} for a reader with question {n * 31 + i}."
                          for i in range(5)]}
    size = 320 if long else 12
    return {k: f"{k} {n}: " + " ".join(f"w{(n * 7919 + j * 104729 + i) % 1000003}" for i in range(size))
            for j, k in enumerate(keys)}


def _content(mode: str, schema: dict | None, n: int, prompt: str) -> str:
    """The assistant's text for a request in ``mode`` (a content fault, or ``ok``)."""
    answer = json.dumps(_fill(schema, n, "300 words" in prompt))
    return {
        "malformed": "{" + answer[1:-1].replace('":', '" ') + "}",
        "truncated": answer[: len(answer) // 2],
        "cut": answer[: len(answer) // 2],
        "wrong_keys": json.dumps({f"other_{k}": v for k, v in json.loads(answer).items()}),
        "empty": json.dumps({k: "" for k in json.loads(answer)}),
        "prose": "Sure! Here is a great example for your task, described in words.",
    }.get(mode, answer)


def _hostile_body(body: dict, call: "Call", mode: str, n: int) -> bytes:
    """The whole response body (bytes, as sent) of a hostile answer ``mode`` (one of :data:`HOSTILE`)."""
    if mode == "deep_body":
        call.status = 200
        return b'{"id": "cmpl-deep", "choices": ' + b"[" * DEPTH + b"]" * DEPTH + b"}"
    if mode == "bad_bytes":
        call.status = 200
        return b'{"id": "cmpl-bytes", "choices": [{"index": 0, "message": {"content": "\xff\xfe\xc0"}}]}'
    answer = _completion(body, call, "ok", n)
    content = answer["choices"][0]["message"]["content"]
    fields = json.loads(content)
    first = next(iter(fields))
    if mode in ("deep", "huge_int", "nan"):
        literal = {"deep": "[" * DEPTH + "]" * DEPTH, "huge_int": "7" * 5000, "nan": "NaN"}[mode]
        content = content.replace(json.dumps(fields[first]), literal, 1)
    elif mode in ("surrogate", "nul", "huge_field", "object_field"):
        text = fields[first] if isinstance(fields[first], str) else " ".join(fields[first])
        fields[first] = {"surrogate": text + " \ud800 " + b"\xff".decode("utf-8", "surrogateescape"),
                         "nul": text + "\x00 more", "huge_field": "x " * 1_000_000,
                         "object_field": {"text": fields[first]}}[mode]
        content = json.dumps(fields, ensure_ascii=False)  # a raw lone surrogate: escaped in the envelope below
    elif mode == "no_choices":
        answer.pop("choices")
    elif mode == "bad_message":
        answer["choices"][0]["message"] = {"role": "assistant", "content": ["not", "text"]} if n % 2 else "text"
    elif mode == "bad_usage":
        answer["usage"] = {"prompt_tokens": ["many", None, -5, 2.5, "12"][n % 5],
                           "completion_tokens": [float("nan"), "-3", 1e30, None, -1][n % 5]}
    if mode not in ("no_choices", "bad_message"):
        answer["choices"][0]["message"]["content"] = content
        call.completion_tokens = len(content) // 4 + 1
        if mode != "bad_usage":
            answer["usage"].update(completion_tokens=call.completion_tokens,
                                   total_tokens=call.prompt_tokens + call.completion_tokens)
    return json.dumps(answer).encode()  # ensure_ascii: lone surrogates as \ud800 escapes, NaN as NaN


def _completion(body: dict, call: "Call", mode: str, n: int) -> dict:
    """A chat.completion object answering ``body``; fills the call's status and tokens."""
    fmt = body.get("response_format") or {}
    schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
    content = _content(mode, schema, n, call.prompt)
    call.status, call.prompt_tokens, call.completion_tokens = 200, len(call.prompt) // 4 + 1, len(content) // 4 + 1
    return {"id": f"cmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "length" if mode == "cut" else "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                      "total_tokens": call.prompt_tokens + call.completion_tokens}}


def _prompt(body: dict) -> str:
    messages = body.get("messages") or [{}]
    return str(messages[-1].get("content", "")) if isinstance(messages[-1], dict) else ""


def _multipart(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, bytes)."""
    boundary = next((p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith(
        "boundary=")), None)
    if not boundary:
        return {}
    fields = {}
    for part in data.split(b"--" + boundary.encode()):
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        disposition = next((line for line in head.decode(errors="replace").split("\r\n")
                            if line.lower().startswith("content-disposition")), "")
        params = dict(p.strip().split("=", 1) for p in disposition.split(";")[1:] if "=" in p)
        name = params.get("name", "").strip('"')
        filename = params["filename"].strip('"') if "filename" in params else None
        fields[name] = (filename, value[:-2] if value.endswith(b"\r\n") else value)
    return fields


class _AzurePaths:
    """Azure OpenAI's paths (``/openai/files``, ``/openai/batches``, ``/openai/deployments/<name>/chat/...``) served
    as the OpenAI ones, so the AzureOpenAI client can be tested here too (pure ASGI: disconnects still show)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/openai/"):
            rest = path[len("/openai/"):]
            if rest.startswith("deployments/"):
                rest = rest.split("/", 2)[2] if rest.count("/") >= 2 else rest
            scope = {**scope, "path": "/v1/" + rest, "raw_path": ("/v1/" + rest).encode()}
        await self.app(scope, receive, send)


def build_app(faults: list[str], latency_s: float, slots: int, hang_s: float = 30.0, retry_after_s: float = 0.05,
              batch_faults: list[str] | None = None, batch_polls: int = 2, max_file_bytes: int | None = None,
              deterministic: bool = False):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    app = FastAPI()
    app.add_middleware(_AzurePaths)
    schedule = itertools.cycle(faults or ["ok"])
    batch_schedule = itertools.cycle(batch_faults or ["complete"])
    counter = itertools.count()
    app.state.calls = []
    app.state.gate = None
    app.state.files = {}  # file id -> {"meta": FileObject dict, "data": bytes}
    app.state.batches = {}  # batch id -> {"batch": Batch dict, "fault": str, "polls": int}
    app.state.batch_lines = []  # (batch id, custom_id) of every line of every batch created
    app.state.batch_polls = batch_polls  # a test may change it while batches are in flight

    def number(request_id: str) -> int:
        """The answer's seed: the request's own id when deterministic, else the arrival order."""
        n = next(counter)
        return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) % 1_000_003 if deterministic \
            and request_id else n

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind}}, status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "test-model", "object": "model"}]}

    hostile = itertools.cycle(HOSTILE)

    def next_mode() -> str:
        mode = next(schedule)
        return next(hostile) if mode == "hostile" else mode

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        mode, n = next_mode(), number(request.headers.get("x-ray-e5-request-id", ""))
        prompt = _prompt(body)
        call = Call(time.time(), mode, prompt, request.headers.get("authorization", ""),
                    request.headers.get("x-ray-e5-request-id", ""))
        app.state.calls.append(call)
        if app.state.gate is None:
            app.state.gate = asyncio.Semaphore(slots)
        async with app.state.gate:
            await asyncio.sleep(latency_s)
        if await request.is_disconnected():  # the client went away (killed): nothing is delivered or billed
            call.status = 499
            return JSONResponse({"error": {"message": "client closed request", "type": "client_closed"}}, 499)
        if mode in ("429", "401", "500"):
            call.status = int(mode)
        if mode == "429":
            return JSONResponse({"error": {"message": "rate limited", "type": "rate_limit"}}, 429,
                                headers={"Retry-After": f"{retry_after_s:g}"})
        if mode == "401":  # a careless server that echoes the key it refused: clients must never print this
            return JSONResponse({"error": {"message": f"invalid key {request.headers.get('authorization')}",
                                           "type": "invalid_request_error"}}, 401)
        if mode == "500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        if mode == "timeout":
            await asyncio.sleep(hang_s)
        if mode == "bad_body":
            call.status = 200
            return PlainTextResponse("not json at all", 200)
        if mode in HOSTILE:
            return Response(_hostile_body(body, call, mode, n), 200, media_type="application/json")
        return _completion(body, call, mode, n)

    # ---- the Batch API: files ------------------------------------------------------------------------------
    def store_file(data: bytes, filename: str, purpose: str) -> dict:
        meta = {"id": f"file-{len(app.state.files):06d}", "object": "file", "bytes": len(data),
                "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed"}
        app.state.files[meta["id"]] = {"meta": meta, "data": data}
        return meta

    @app.post("/v1/files")
    async def upload(request: Request):
        length = int(request.headers.get("content-length") or 0)
        if max_file_bytes is not None and length > max_file_bytes + 4096:  # refused before reading the body
            return error(413, f"file too large: {length} bytes; the limit is {max_file_bytes} bytes")
        fields = _multipart(request.headers.get("content-type", ""), await request.body())
        filename, data = fields.get("file", (None, b""))
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if filename is None:
            return error(400, "no file in the upload")
        if max_file_bytes is not None and len(data) > max_file_bytes:
            return error(413, f"file too large: {len(data)} bytes; the limit is {max_file_bytes} bytes")
        if purpose != "batch":
            return error(400, f"unsupported purpose {purpose!r}")
        return store_file(data, filename, purpose)

    @app.get("/v1/files/{file_id}")
    async def file_meta(file_id: str):
        found = app.state.files.get(file_id)
        return found["meta"] if found else error(404, f"no such file {file_id}")

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        found = app.state.files.get(file_id)
        if not found:
            return error(404, f"no such file {file_id}")
        return Response(found["data"], media_type="application/octet-stream")

    # ---- the Batch API: batches ----------------------------------------------------------------------------
    @app.post("/v1/batches")
    async def create_batch(request: Request):
        body = await request.json()
        found = app.state.files.get(body.get("input_file_id"))
        if not found:
            return error(404, f"no such file {body.get('input_file_id')}")
        if body.get("endpoint") not in ("/v1/chat/completions", "/chat/completions"):
            return error(400, f"unsupported endpoint {body.get('endpoint')!r}")
        lines = [line for line in found["data"].decode().splitlines() if line.strip()]
        batch_id = f"batch_{len(app.state.batches):06d}"
        ids = []
        for line in lines:
            try:
                ids.append(json.loads(line)["custom_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                return error(400, "a line of the input file is not a request with a custom_id")
        if len(set(ids)) < len(ids):
            return error(400, "duplicate custom_id in the input file")
        app.state.batch_lines.extend((batch_id, i) for i in ids)
        now = int(time.time())
        batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                 "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window", "24h"),
                 "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
                 "expires_at": now + 86400, "metadata": body.get("metadata"), "model": None,
                 "request_counts": {"total": len(ids), "completed": 0, "failed": 0}}
        app.state.batches[batch_id] = {"batch": batch, "fault": next(batch_schedule), "polls": 0, "lines": lines,
                                       "authorization": request.headers.get("authorization", "")}
        return batch

    def finish_batch(entry: dict, status: str | None = None) -> None:
        """Answer the batch's lines as its fault says and write its output and error files."""
        batch, fault, lines = entry["batch"], entry["fault"], entry["lines"]
        if status == "cancelled" or fault == "fail":
            batch["status"] = status or "failed"
            if fault == "fail" and status is None:
                batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "line": 1,
                                                              "message": "the batch failed (injected)"}]}
            batch["request_counts"]["failed"] = 0 if status == "cancelled" else len(lines)
            batch[f"{batch['status']}_at"] = int(time.time())
            return
        out, err = [], []
        for i, line in enumerate(lines):
            request = json.loads(line)
            rid = request["custom_id"]
            if fault == "expire" and i >= len(lines) // 2:
                err.append({"id": f"batch_req_{i}", "custom_id": rid, "response": None,
                            "error": {"code": "batch_expired", "message": "the batch expired"}})
                continue
            if fault == "errors" and i % 3 == 2:
                err.append({"id": f"batch_req_{i}", "custom_id": rid, "error": None,
                            "response": {"status_code": 500, "request_id": f"req_{i}",
                                         "body": {"error": {"message": "boom", "type": "server_error"}}}})
                continue
            body = request.get("body") or {}
            mode, n = next_mode(), number(rid)
            call = Call(time.time(), "batch", _prompt(body), entry["authorization"], rid)
            if mode in ("429", "401", "500", "timeout"):
                call.status = 500 if mode == "timeout" else int(mode)
                app.state.calls.append(call)
                err.append({"id": f"batch_req_{i}", "custom_id": rid, "error": None,
                            "response": {"status_code": call.status, "request_id": f"req_{i}",
                                         "body": {"error": {"message": "injected", "type": "server_error"}}}})
                continue
            if mode in HOSTILE:
                call.mode = mode  # (the kind, for tests to match each line to its drop reason)
                raw = _hostile_body(body, call, mode, n)
                app.state.calls.append(call)
                text = (json.dumps({"id": f"batch_req_{i}", "custom_id": rid, "error": None,
                                    "response": {"status_code": 200, "request_id": f"req_{i}"}})[:-2].encode()
                        + b', "body": ' + raw + b"}}")
            else:
                answer = _completion(body, call, mode, n)
                app.state.calls.append(call)
                if mode == "bad_body":  # a 200 whose body is not a chat completion
                    answer = "not json at all"
                record = {"id": f"batch_req_{i}", "custom_id": rid, "error": None,
                          "response": {"status_code": 200, "request_id": f"req_{i}", "body": answer}}
                text = json.dumps(record).encode()
            out.append(text[: len(text) // 3] if fault == "malformed" and i % 4 == 3 else text)
        batch["status"] = "expired" if fault == "expire" else "completed"
        batch[f"{batch['status']}_at"] = int(time.time())
        batch["request_counts"].update(completed=len(out), failed=len(err))
        if out:
            batch["output_file_id"] = store_file(b"\n".join(out) + b"\n", f"{batch['id']}_output.jsonl",
                                                 "batch_output")["id"]
        if err:
            batch["error_file_id"] = store_file(("\n".join(json.dumps(e) for e in err) + "\n").encode(),
                                                f"{batch['id']}_error.jsonl", "batch_output")["id"]

    @app.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str):
        entry = app.state.batches.get(batch_id)
        if not entry:
            return error(404, f"no such batch {batch_id}")
        batch = entry["batch"]
        if batch["status"] == "cancelling":
            finish_batch(entry, "cancelled")
        elif batch["status"] in ("validating", "in_progress"):
            entry["polls"] += 1
            if entry["polls"] > app.state.batch_polls:
                finish_batch(entry)
            else:
                batch["status"] = "in_progress"
                total = batch["request_counts"]["total"]  # progress as the polls go by
                batch["request_counts"]["completed"] = min(total, total * (entry["polls"] - 1)
                                                           // max(1, app.state.batch_polls))
        return batch

    @app.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None):
        every = sorted(app.state.batches, reverse=True)  # newest first, as the API lists them
        start = every.index(after) + 1 if after in every else 0
        page = every[start:start + limit]
        return {"object": "list", "data": [app.state.batches[b]["batch"] for b in page],
                "first_id": page[0] if page else None, "last_id": page[-1] if page else None,
                "has_more": start + limit < len(every)}

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        entry = app.state.batches.get(batch_id)
        if not entry:
            return error(404, f"no such batch {batch_id}")
        if entry["batch"]["status"] in ("validating", "in_progress"):
            entry["batch"]["status"] = "cancelling"
        return entry["batch"]

    return app


class TestServer:
    """Runs the fake server with uvicorn in a background thread on a free loopback port."""

    __test__ = False  # not a pytest class

    def __init__(self, faults: list[str] | None = None, latency_s: float = 0.0, slots: int = 64, hang_s: float = 30.0,
                 retry_after_s: float = 0.05, port: int | None = None, batch_faults: list[str] | None = None,
                 batch_polls: int = 2, max_file_bytes: int | None = None, deterministic: bool = False):
        self.app = build_app(list(faults or []), latency_s, slots, hang_s, retry_after_s, batch_faults, batch_polls,
                             max_file_bytes, deterministic)
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> list[Call]:
        return self.app.state.calls

    @property
    def batch_lines(self) -> list[tuple[str, str]]:
        """(batch id, custom_id) of every line of every batch created, in order."""
        return self.app.state.batch_lines

    def batch_results(self, batch_id: str) -> tuple[list[str], list[str]]:
        """The custom_ids in a finished batch's output file (answered) and in its error file."""
        batch = self.app.state.batches[batch_id]["batch"]

        def ids(file_id):
            if not file_id:
                return []
            found = []
            for line in self.app.state.files[file_id]["data"].decode().splitlines():
                try:
                    found.append(json.loads(line)["custom_id"])
                except (json.JSONDecodeError, KeyError):
                    found.append(None)  # a malformed line
            return found

        return ids(batch["output_file_id"]), ids(batch["error_file_id"])

    @property
    def batches(self) -> dict[str, dict]:
        """Batch id -> the Batch object as the server last reported it."""
        return {k: v["batch"] for k, v in self.app.state.batches.items()}

    @property
    def files(self) -> dict[str, dict]:
        """File id -> the File object (uploads and the batches' output and error files)."""
        return {k: v["meta"] for k, v in self.app.state.files.items()}

    def __enter__(self) -> "TestServer":
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError(f"test server did not start on port {self.port}")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--faults", default="ok", help="comma-separated schedule, e.g. ok,ok,429,prose")
    parser.add_argument("--batch-faults", default="complete",
                        help=f"comma-separated schedule of batch endings ({', '.join(BATCH_FAULTS)})")
    parser.add_argument("--batch-polls", type=int, default=2, help="polls a batch stays in progress")
    parser.add_argument("--max-file-bytes", type=int, help="refuse larger uploads with a 413")
    parser.add_argument("--deterministic", action="store_true", help="answers depend only on the request id")
    args = parser.parse_args()
    with TestServer([f for f in args.faults.split(",") if f], args.latency, args.slots, port=args.port,
                    batch_faults=[f for f in args.batch_faults.split(",") if f], batch_polls=args.batch_polls,
                    max_file_bytes=args.max_file_bytes, deterministic=args.deterministic) as server:
        print(f"OpenAI-compatible test server on {server.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
