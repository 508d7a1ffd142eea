"""A small local OpenAI-compatible chat server that stands in for hosted APIs in tests and benchmarks.

It answers /v1/chat/completions with a JSON object that fills the requested JSON schema's keys, after a fixed
latency and through K concurrent slots, and injects faults from a repeating schedule: ``429`` (with Retry-After),
``500``, ``timeout`` (sleeps past the client's timeout), ``malformed``, ``truncated``, ``wrong_keys``, ``empty``,
``prose``. Run it in-process (a thread) with :class:`TestServer`.
"""


import asyncio
import itertools
import json
import socket
import threading
import time

FAULTS = ("429", "500", "timeout", "malformed", "truncated", "wrong_keys", "empty", "prose")


def _fill(schema: dict | None, n: int) -> dict:
    keys = list((schema or {}).get("properties", {})) or ["text"]
    if keys == ["tasks"]:
        return {"tasks": [f"Retrieve documents about topic number {n}-{i} for a curious reader." for i in range(5)]}
    return {k: f"{k} number {n}: " + " ".join(f"word{(n * 7 + i) % 997}" for i in range(12)) for k in keys}


def build_app(faults: list[str], latency_s: float, slots: int, hang_s: float = 30.0):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    schedule = itertools.cycle(faults or ["ok"])
    counter = itertools.count()
    gate = asyncio.Semaphore(slots)
    app.state.calls = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "test-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        mode = next(schedule)
        n = next(counter)
        app.state.calls.append(mode)
        async with gate:
            await asyncio.sleep(latency_s)
        if mode == "429":
            return JSONResponse({"error": {"message": "rate limited", "type": "rate_limit"}}, 429,
                                headers={"Retry-After": "0.05"})
        if mode == "500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        if mode == "timeout":
            await asyncio.sleep(hang_s)
        fmt = body.get("response_format") or {}
        schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
        answer = _fill(schema, n)
        content = {
            "malformed": "{" + json.dumps(answer)[1:-1].replace('":', '" ') + "}",
            "truncated": json.dumps(answer)[: len(json.dumps(answer)) // 2],
            "wrong_keys": json.dumps({f"other_{k}": v for k, v in answer.items()}),
            "empty": json.dumps({k: "" for k in answer}),
            "prose": "Sure! Here is a great example for your task, described in words.",
        }.get(mode, json.dumps(answer))
        if mode == "bad_body":
            return PlainTextResponse("not json at all", 200)
        return {"id": f"cmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 40, "total_tokens": 90}}

    return app


class TestServer:
    """Runs the fake server with uvicorn in a background thread on a free loopback port."""

    __test__ = False  # not a pytest class

    def __init__(self, faults: list[str] | None = None, latency_s: float = 0.0, slots: int = 64, hang_s: float = 30.0):
        self.app = build_app(list(faults or []), latency_s, slots, hang_s)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> list[str]:
        return self.app.state.calls

    def __enter__(self) -> "TestServer":
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
