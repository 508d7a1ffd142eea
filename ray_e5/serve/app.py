"""The Ray Serve application: OpenAI-compatible /v1/embeddings with dynamic, token-budgeted batching.

Concurrent requests share forward passes through a continuous batcher (``batcher.py``): whenever the model thread
is free it takes every queued request, up to a token budget. Inside a batch, texts are sorted by length and cut
into sub-batches whose padded size stays under ``max_batch_tokens``, as TEI's max-batch-tokens does. The forward
runs in its own thread, so the replica keeps accepting requests (and queueing the next batch) while it computes.

No request can reach a bare 5xx: headers and body are checked before anything is parsed (``protocol.py``: 415 for a
wrong Content-Type or Content-Encoding, 413 for a body over the limit, 400 for every malformed JSON), a queue over
``max_queued_requests`` / ``max_queued_tokens`` answers 429 with Retry-After, a request past ``request_timeout_s``
answers 504, and any exception anywhere answers a JSON 500 carrying the request id (the traceback goes to the log).
Every error is ``{"error": {"message", "type", "param", "code"}}``.

No request can hold a replica: the body must arrive within ``body_read_timeout_s`` (408), a request asking for more
than ``max_tokens_per_request`` tokens is refused (413) before it is queued, tokenisation runs in a thread (not on
the event loop every request shares), and the work of a request that timed out is dropped: never batched when it was
still queued, and skipped between sub-batches when its batch was already computing.

Auth cannot fail open: the key is read on the driver, where the user set it, and reaches the replicas as a
``SecretStr`` constructor argument (not their environment, which on an existing cluster is the raylet's); tokens are
compared as bytes, so a header of any shape or encoding is a 401 or 400.
"""


import asyncio
import hmac
import json
import logging
import math
import os
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import SecretStr
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_e5 import storage
from ray_e5.serve.batcher import ContinuousBatcher, Overloaded
from ray_e5.serve.config import ServeSettings
from ray_e5.serve.protocol import (ApiError, check_headers, embedding_response, openapi_responses,
                                   openapi_request_body, parse_request, shape_vectors)

logger = logging.getLogger("ray.serve")

api = FastAPI(title="ray-e5 embeddings", version="1",
              description="OpenAI-compatible embeddings. Every error is {\"error\": {\"message\", \"type\", "
                          "\"param\", \"code\"}}.")

KNOWN_ROUTES = {"/v1/embeddings": "POST", "/v1/models": "GET", "/health": "GET", "/openapi.json": "GET",
                "/docs": "GET", "/redoc": "GET"}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    """A JSON response whatever the body holds: ASCII-escaped, so no string can fail to encode."""
    return Response(json.dumps(body, ensure_ascii=True, default=str), status_code=status,
                    media_type="application/json", headers=headers)


def _error(err: ApiError, headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return _json(err.body(), err.status, headers)


def request_id(headers: Any = None) -> str:
    """Ray Serve's id of the current request (it comes back in x-request-id), else the client's, else a new one."""
    rid = ""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside a replica
        pass
    if not rid and headers is not None:
        rid = headers.get("x-request-id", "") or ""
    rid = _SAFE_ID.sub("", str(rid))[:64]
    return rid or uuid.uuid4().hex


def internal_error(rid: str) -> Response:
    err = ApiError(500, f"internal error while serving request {rid}; the details are in the server log",
                   code="internal_error", kind="server_error")
    return _error(err, {"x-request-id": rid})


class NeverBare500:
    """Outermost ASGI guard: an exception escaping any route or middleware becomes a JSON 500 with a request id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - logged with its traceback, answered as JSON
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            rid = request_id(headers)
            logger.exception("ray-e5: request %s failed", rid)
            if started:  # part of a response is out: nothing more can be said on this connection
                return
            await internal_error(rid)(scope, receive, send)


api.add_middleware(NeverBare500)


@api.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException):
    """Starlette's own 404/405/... as OpenAI-style errors (a wrong method on a route, a malformed path)."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    route = "/" + request.url.path.strip("/")
    message = str(exc.detail)
    if exc.status_code == 405 and route in KNOWN_ROUTES:
        message = f"{request.method} is not allowed on {route}; use {KNOWN_ROUTES[route]}"
    headers = {k: v for k, v in (exc.headers or {}).items()}
    return _error(ApiError(exc.status_code, message, code=code, kind=kind), headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error(ApiError(400, f"invalid request: {str(exc)[:500]}", code="invalid_request"))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it is known to exceed ``limit``: before reading, when Content-Length
    says so, and while streaming a chunked one."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {ascii(declared)[:40]} is not a number", param="Content-Length",
                           code="invalid_header") from None
        if size > limit:
            raise ApiError(413, f"request body is {size} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # a deadline is put on this loop by the caller (body_read_timeout_s)
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def load_replica_embedder(settings: ServeSettings, local: str):
    """The Embedder a replica serves, at the settings its run scored it with (the embedder's ``inference`` block:
    max length, dtype, ``auto`` resolved on this node) unless ``serve.max_tokens_per_input`` / ``serve.dtype`` say
    otherwise; without a block, the training length and :meth:`ServeSettings.replica_dtype`'s default."""
    from ray_e5.model import Embedder
    from ray_e5.model.embedder import inference_defaults, read_inference

    scored = inference_defaults(read_inference(local))
    overrides = {"dtype": settings.dtype or scored.get("dtype") or settings.replica_dtype()}
    if settings.max_tokens_per_input:
        overrides["max_length"] = settings.max_tokens_per_input
    return Embedder.load(local, merge_lora=True, **overrides)


def replica_max_tokens(settings: ServeSettings, model_max_length: int) -> int:
    """Tokens an input may use: ``serve.max_tokens_per_input``, capped by the length the model was loaded at."""
    return min(settings.max_tokens_per_input or model_max_length, model_max_length)


@serve.deployment(name="ray-e5-embeddings")
@serve.ingress(api)
class EmbeddingServer:
    def __init__(self, settings: dict[str, Any], model_ref: str, api_key: SecretStr | None = None):
        from ray.serve.metrics import Counter, Histogram

        self.settings = ServeSettings.model_validate(settings)
        local = storage.local_copy(model_ref)  # a model directory on object storage is copied to this node once
        if self.settings.backend == "vllm":
            from ray_e5.serve.vllm_backend import MergedModelText, VllmForward

            self.text = MergedModelText.load(local)  # tokenizer and settings; vLLM loads the weights
            forward = VllmForward(self.settings, local, self.text)
        else:
            if self.settings.num_gpus == 0:
                import torch

                # Ray sets OMP_NUM_THREADS=1 in actors unless told otherwise; a CPU replica uses the cores it reserved.
                torch.set_num_threads(self.settings.cpu_threads())
            self.embedder = load_replica_embedder(self.settings, local)
            if self.settings.num_gpus > 0:
                self.embedder.to("cuda")
            self.text = self.embedder
            forward = self._forward
        self.model_ref = model_ref
        self.names = {self.settings.model_name, model_ref}
        self.max_tokens = replica_max_tokens(self.settings, self.text.settings.max_length)
        # The key comes from the driver only (never this replica's environment): an empty one means no auth.
        secret = api_key.get_secret_value() if api_key is not None else ""
        self._key = secret.encode("utf-8") if secret else None
        logger.info("ray-e5: %s serving %s with API key auth %s", type(self).__name__, self.settings.model_name,
                    "ON" if self._key else "OFF")
        self.batcher = ContinuousBatcher(forward, self.settings.max_batch_tokens,
                                         self.settings.max_batch_requests, self.settings.batch_wait_timeout_s,
                                         max_queued_requests=self.settings.max_queued_requests,
                                         max_queued_tokens=self.settings.max_queued_tokens
                                         or self.settings.max_batch_tokens)
        tags = ("model",)
        self.m_requests = Counter("ray_e5_requests", "embedding requests by status", tag_keys=("model", "status"))
        self.m_tokens = Counter("ray_e5_prompt_tokens", "tokens embedded", tag_keys=tags)
        self.m_batch = Histogram("ray_e5_batch_texts", "texts per forward pass", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=tags)
        self.m_latency = Histogram("ray_e5_request_latency_s", "request latency",
                                   boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], tag_keys=tags)

    # ---- batching ----------------------------------------------------------------------------------------
    def _forward(self, items: list[list[int]], alive=None) -> list:
        """Vectors for ``items`` (None for an item whose request is gone: ``alive(i)`` false before its sub-batch)."""
        import torch

        from ray_e5.model.tokenize import pad

        out: list = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(items[i]), reverse=True)
        if alive is not None:
            order = [i for i in order if alive(i)]
        budget = self.settings.max_batch_tokens
        device = self.embedder.device
        start = 0
        while start < len(order):
            width = len(items[order[start]])  # the longest in this sub-batch: sets its padded size
            count = max(1, min(len(order) - start, budget // max(width, 1)))
            chunk = order[start:start + count]
            start += count
            if alive is not None:  # a request that timed out while earlier sub-batches computed: skip its texts
                chunk = [i for i in chunk if alive(i)]
                if not chunk:
                    continue
            batch = {k: v.to(device) for k, v in pad([items[i] for i in chunk], self.embedder.tokenizer.pad_token_id,
                                                    "right").items()}
            with torch.inference_mode():
                vectors = self.embedder(**batch).cpu().numpy()
            self.m_batch.observe(len(chunk), tags={"model": self.settings.model_name})
            for row, i in enumerate(chunk):
                out[i] = vectors[row]
        return out  # type: ignore[return-value]

    # ---- routes ------------------------------------------------------------------------------------------
    def _check_auth(self, request: Request) -> None:
        """Bearer auth on the raw header bytes: any bytes, any shape, is a 401 (or 400 for several headers)."""
        if self._key is None:
            return
        values = [v for k, v in request.headers.raw if k.lower() == b"authorization"]
        if len(values) > 1:
            raise ApiError(400, f"{len(values)} Authorization headers were sent; send one: 'Authorization: Bearer "
                                "<key>'", param="Authorization", code="invalid_header")
        scheme, _, token = (values[0] if values else b"").strip().partition(b" ")
        # compare_digest on bytes takes any bytes (on str it raises for non-ASCII) and in time independent of them
        if not hmac.compare_digest(token.strip(), self._key) or scheme.lower() != b"bearer":
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", kind="authentication_error")

    def _token_ids(self, texts: list[str], instruction: str | None) -> list[list[int]]:
        from ray_e5.model.tokenize import token_ids

        formatted = self.text.format(texts, instruction)
        if self.settings.on_long_input == "error":
            full = token_ids(self.text.tokenizer, formatted, 10**9, self.text.append_eos)
            long = next((i for i, ids in enumerate(full) if len(ids) > self.max_tokens), None)
            if long is not None:
                raise ApiError(413, f"input[{long}] has {len(full[long])} tokens; the limit is {self.max_tokens}",
                               param=f"input[{long}]", code="input_too_long")
        return token_ids(self.text.tokenizer, formatted, self.max_tokens, self.text.append_eos)

    async def _embed(self, body: bytes):
        """Parse, tokenise (both in a thread: the event loop serves every other request meanwhile), bound the
        request's tokens, then queue it; cancelled by the request timeout at any point, so its work is dropped."""
        req = await asyncio.to_thread(parse_request, body, max_body_bytes=self.settings.max_body_bytes,
                                      max_inputs=self.settings.max_inputs_per_request, dimension=self.text.dimension,
                                      model_names=self.names)
        ids = await asyncio.to_thread(self._token_ids, req.texts, req.instruction)
        tokens = sum(len(x) for x in ids)
        if tokens > self.settings.max_tokens_per_request:
            raise ApiError(413, f"the request's {len(ids)} inputs have {tokens} tokens; the limit per request is "
                                f"{self.settings.max_tokens_per_request} (serve.max_tokens_per_request): send fewer "
                                "or shorter inputs per request", param="input", code="request_too_many_tokens")
        return (req, ids), await self.batcher.embed(ids)

    @api.post("/v1/embeddings", openapi_extra={"requestBody": openapi_request_body()},
              responses=openapi_responses(), response_class=Response,
              summary="Embed text (OpenAI /v1/embeddings, with an 'instruction' extension for queries)")
    async def embeddings(self, request: Request):
        started = time.perf_counter()
        status = "ok"
        try:
            self._check_auth(request)
            check_headers(request.headers.get("content-type"), request.headers.get("content-encoding"))
            try:
                body = await asyncio.wait_for(read_body(request, self.settings.max_body_bytes),
                                              self.settings.body_read_timeout_s)
            except asyncio.TimeoutError:
                status = "408"
                return _error(ApiError(408, f"request body not received within {self.settings.body_read_timeout_s:g}"
                                            " s (serve.body_read_timeout_s); send the whole body at once",
                                       code="body_timeout"), {"Connection": "close"})
            try:
                (req, ids), vectors = await asyncio.wait_for(self._embed(body), self.settings.request_timeout_s)
            except Overloaded as err:
                wait = err.retry_after_s
                status = "429"
                return _error(ApiError(429, f"server overloaded: {err.message}; retry after {wait:.2f} s",
                                       code="overloaded", kind="rate_limit_error"),
                              {"Retry-After": str(max(1, math.ceil(wait))),
                               "retry-after-ms": str(max(1, round(wait * 1000)))})
            except asyncio.TimeoutError:
                status = "504"
                return _error(ApiError(504, f"request not answered within {self.settings.request_timeout_s:g} s "
                                            "(serve.request_timeout_s); retry, or send fewer inputs",
                                       code="timeout", kind="server_error"))
            tokens = sum(len(x) for x in ids)
            self.m_tokens.inc(tokens, tags={"model": self.settings.model_name})
            body = embedding_response(shape_vectors(vectors, req.dimensions), req.encoding_format, req.model, tokens)
            return Response(body, media_type="application/json")
        except ApiError as err:
            status = str(err.status)
            return _error(err)
        except Exception:  # noqa: BLE001 - a JSON 500 with the request id; the traceback goes to the log
            status = "500"
            rid = request_id(request.headers)
            logger.exception("ray-e5: request %s failed", rid)
            return internal_error(rid)
        finally:
            self.m_requests.inc(tags={"model": self.settings.model_name, "status": status})
            self.m_latency.observe(time.perf_counter() - started, tags={"model": self.settings.model_name})

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._check_auth(request)
        except ApiError as err:
            return _error(err)
        return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model", "owned_by": "ray-e5",
                                            "root": self.model_ref, "dimension": self.text.dimension,
                                            "max_tokens": self.max_tokens}]}

    @api.get("/health")
    async def health(self):
        """Liveness and this replica's queue: what is waiting now, the peaks seen, the bounds, requests refused."""
        return {"status": "ok", "model": self.settings.model_name, "pid": os.getpid(), "queue": self.batcher.stats()}

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                   include_in_schema=False)
    async def unknown_route(self, request: Request, path: str):
        """Unknown routes and wrong methods get OpenAI-style JSON errors too (declared after the real routes)."""
        route = "/" + path.strip("/")
        if route in KNOWN_ROUTES:
            return _error(ApiError(405, f"{request.method} is not allowed on {route}; use {KNOWN_ROUTES[route]}",
                                   code="method_not_allowed"), {"Allow": KNOWN_ROUTES[route]})
        return _error(ApiError(404, f"no route {request.method} {route}; routes: POST /v1/embeddings, "
                                    "GET /v1/models, GET /health", code="not_found"))


def build_app(settings: ServeSettings, model_ref: str, api_key: SecretStr | None = None):
    """The bound application, with the config's replicas, autoscaling, resources and ingress applied.

    ``api_key`` (default: :meth:`ServeSettings.resolve_api_key`, read here on the driver) reaches the replicas as a
    constructor argument: not an environment variable, not the settings (which Serve's status shows)."""
    if api_key is None:
        api_key = settings.resolve_api_key()
    auto = settings.autoscaling
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus,
                              "runtime_env": {"env_vars": settings.ingress_env()}},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "logging_config": {"enable_access_log": settings.access_log},
    }
    if auto.min_replicas == auto.max_replicas:  # a fixed count: no autoscaling loop in the controller
        options["num_replicas"] = auto.max_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
                                         "target_ongoing_requests": auto.target_ongoing_requests}
    return EmbeddingServer.options(**options).bind(settings.model_dump(exclude={"api_key"}), model_ref, api_key)


def start_serve(settings: ServeSettings) -> None:
    """Start Ray Serve (HTTP on ``host:port``) with the ingress the settings ask for.

    A Serve instance already running keeps its own HTTP options (Serve would only warn): when they differ from
    ``serve.host``/``serve.port`` this raises ServeConflict instead of serving somewhere the config does not say.
    """
    from ray import serve as ray_serve

    from ray_e5.serve.instance import check_http_options

    check_http_options(settings.host, settings.port, "serve.host/serve.port",
                       "Set serve.host and serve.port to those, or shut the running Serve down first "
                       "(`serve shutdown`, which ends every app on it).")
    ray_serve.start(http_options={"host": settings.host, "port": settings.port},
                    controller_options={"runtime_env": {"env_vars": settings.ingress_env()}})


def app_builder(args: dict[str, Any]):
    """For `serve deploy` / `serve run ray_e5.serve.app:app_builder model=...`: args are ServeSettings fields."""
    from ray_e5.config import validate

    settings = validate(ServeSettings, dict(args), prefix="serve.")
    key = settings.resolve_api_key()  # the process that builds the app: `serve run`'s, or the controller's for deploy
    settings.check_exposure(key)
    return build_app(settings, settings.model or "gemma3-270m", key)
