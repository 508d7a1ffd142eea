"""A small local OpenAI-compatible chat server that stands in for hosted APIs in tests and benchmarks.

It answers /v1/chat/completions with a JSON object that fills the requested JSON schema's keys with distinct text
(about 320 words per field when the prompt asks for 300 words or more), after a fixed latency and through K
concurrent slots (so its capacity is exactly K / latency requests per second). Faults come from a repeating
schedule, one entry per request: ``ok``, ``429`` (with Retry-After), ``500``, ``timeout`` (sleeps past the
client's timeout), ``malformed``, ``truncated``, ``wrong_keys``, ``empty``, ``prose``, ``bad_body`` (a 200 that is
not JSON), ``cut`` (truncated JSON with finish_reason "length"), ``401`` (refuses the key, echoing it). It records every call (time, mode, prompt,
Authorization header, the client's request id header, the status and tokens it answered with) for tests to inspect:
``answered`` calls are the ones a hosted API would bill.

In-process: ``with TestServer(faults=[...], latency_s=0.5, slots=16) as server: server.base_url``.
Standalone: ``python -m ray_e5.synth.testserver --port 8011 --latency 0.2 --slots 8 --faults ok,429,prose``.
"""

# (no `from __future__ import annotations`: FastAPI must see the real `Request` annotation)

import argparse
import asyncio
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass

FAULTS = ("429", "500", "timeout", "malformed", "truncated", "wrong_keys", "empty", "prose")


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


def build_app(faults: list[str], latency_s: float, slots: int, hang_s: float = 30.0, retry_after_s: float = 0.05):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    schedule = itertools.cycle(faults or ["ok"])
    counter = itertools.count()
    app.state.calls = []
    app.state.gate = None

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "test-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        mode, n = next(schedule), next(counter)
        messages = body.get("messages") or [{}]
        prompt = str(messages[-1].get("content", ""))
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
        fmt = body.get("response_format") or {}
        schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
        answer = json.dumps(_fill(schema, n, "300 words" in prompt))
        content = {
            "malformed": "{" + answer[1:-1].replace('":', '" ') + "}",
            "truncated": answer[: len(answer) // 2],
            "cut": answer[: len(answer) // 2],
            "wrong_keys": json.dumps({f"other_{k}": v for k, v in json.loads(answer).items()}),
            "empty": json.dumps({k: "" for k in json.loads(answer)}),
            "prose": "Sure! Here is a great example for your task, described in words.",
        }.get(mode, answer)
        call.status, call.prompt_tokens, call.completion_tokens = 200, len(prompt) // 4 + 1, len(content) // 4 + 1
        return {"id": f"cmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "length" if mode == "cut" else "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                          "total_tokens": call.prompt_tokens + call.completion_tokens}}

    return app


class TestServer:
    """Runs the fake server with uvicorn in a background thread on a free loopback port."""

    __test__ = False  # not a pytest class

    def __init__(self, faults: list[str] | None = None, latency_s: float = 0.0, slots: int = 64, hang_s: float = 30.0,
                 retry_after_s: float = 0.05, port: int | None = None):
        self.app = build_app(list(faults or []), latency_s, slots, hang_s, retry_after_s)
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> list[Call]:
        return self.app.state.calls

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
    args = parser.parse_args()
    with TestServer([f for f in args.faults.split(",") if f], args.latency, args.slots, port=args.port) as server:
        print(f"OpenAI-compatible test server on {server.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
