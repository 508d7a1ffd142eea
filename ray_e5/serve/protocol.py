"""The OpenAI embeddings protocol: parse and validate a raw request body, shape responses and errors.

Parsing is done by hand from bytes (not by FastAPI's body model) so that every malformed request, whatever its
shape, gets a 4xx with an OpenAI-style error naming the parameter, and none reaches the model.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson


class ApiError(Exception):
    """An error returned to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class EmbeddingRequest:
    texts: list[str]
    model: str
    encoding_format: str
    dimensions: int | None
    instruction: str | None


_ALLOWED = {"input", "model", "encoding_format", "dimensions", "user", "instruction"}


# ---- defensive JSON: every way a body can be hostile is a 4xx naming what was wrong ------------------------
MAX_JSON_DEPTH = 32  # a valid request nests 2 deep; anything far deeper is an attack or a bug
MAX_NUMBER_CHARS = 64  # an integer literal of thousands of digits would cost quadratic time to convert
JSON_TYPES = ("application/json",)  # accepted Content-Type (charset utf-8 or none)
BOM = b"\xef\xbb\xbf"


class _BadJson(Exception):
    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def _number(kind: type):
    def parse(literal: str):
        if len(literal) > MAX_NUMBER_CHARS:
            raise _BadJson(f"a number literal has {len(literal)} characters; the limit is {MAX_NUMBER_CHARS}",
                           "number_too_large")
        value = kind(literal)
        if kind is float and not math.isfinite(value):
            raise _BadJson(f"the number {literal} is out of range; numbers must be finite doubles", "number_too_large")
        return value
    return parse


def _constant(name: str):
    raise _BadJson(f"{name} is not valid JSON; numbers must be finite", "invalid_json")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _BadJson(f"duplicate key {ascii(key)} in a JSON object; send each key once", "duplicate_key")
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_number(int), parse_float=_number(float),
                            parse_constant=_constant)


def _check_tree(data: Any) -> None:
    """Nesting depth and valid Unicode (no lone surrogates) everywhere in the parsed value, iteratively."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "body")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                name = "the request body" if where == "body" else f"'{where}'"
                raise _BadJson(f"{name} holds an invalid Unicode escape (a lone UTF-16 surrogate at character "
                               f"{err.start}); strings must be valid Unicode", "invalid_unicode",
                               None if where == "body" else where) from None
            continue
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _BadJson(f"JSON nests deeper than {MAX_JSON_DEPTH} levels", "nesting_too_deep")
            if isinstance(value, dict):
                for key, item in value.items():
                    stack.append((key, depth, "a key" if where == "body" else f"a key of {where}"))
                    stack.append((item, depth + 1, _where(where, key)))
            else:
                stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))


def _where(parent: str, key: str) -> str:
    name = key if key.isascii() and key.isprintable() else ascii(key)[1:-1]
    return name if parent == "body" else f"{parent}.{name}"


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body, or a 400 ApiError saying what is wrong with it."""
    if body.startswith(BOM):
        raise ApiError(400, "request body starts with a UTF-8 byte-order mark; send UTF-8 JSON without a BOM",
                       code="invalid_encoding")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {err.start}); send UTF-8 JSON",
                       code="invalid_encoding") from None
    try:
        data = _DECODER.decode(text)
        _check_tree(data)
    except _BadJson as err:
        raise ApiError(400, f"request body is rejected: {err.message}", param=err.param, code=err.code) from None
    except RecursionError:
        raise ApiError(400, f"request body is rejected: JSON nests deeper than {MAX_JSON_DEPTH} levels",
                       code="nesting_too_deep") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
                       code="invalid_json") from None
    except ValueError as err:  # any other conversion limit of the decoder
        raise ApiError(400, f"request body is not valid JSON: {str(err)[:200]}", code="invalid_json") from None
    return data


def check_headers(content_type: str | None, content_encoding: str | None) -> None:
    """415 unless the body is declared as uncompressed JSON in UTF-8."""
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    if media not in JSON_TYPES:
        got = f"Content-Type {ascii(content_type)[1:-1]!r}" if content_type else "no Content-Type"
        raise ApiError(415, f"request has {got}; accepted: 'application/json' (charset utf-8)",
                       param="Content-Type", code="unsupported_media_type")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ApiError(415, f"charset {ascii(value.strip())} is not accepted; send UTF-8 JSON (charset=utf-8)",
                           param="Content-Type", code="unsupported_media_type")
    encodings = [e.strip().lower() for e in (content_encoding or "").split(",") if e.strip()]
    if any(e != "identity" for e in encodings):
        raise ApiError(415, f"Content-Encoding {ascii(content_encoding)} is not accepted; send an uncompressed body "
                            "(no Content-Encoding, or 'identity')", param="Content-Encoding",
                       code="unsupported_content_encoding")


def parse_request(body: bytes, *, max_body_bytes: int, max_inputs: int, dimension: int,
                  model_names: set[str]) -> EmbeddingRequest:
    if len(body) > max_body_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {max_body_bytes}", code="body_too_large")
    if not body.strip():
        raise ApiError(400, "request body is empty; send a JSON object with 'input' and 'model'", code="empty_body")
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_body")
    unknown = sorted(set(data) - _ALLOWED)
    if unknown:
        raise ApiError(400, f"unknown parameter(s) {[ascii(k)[1:-1] for k in unknown]}; accepted: {sorted(_ALLOWED)}",
                       param=ascii(unknown[0])[1:-1], code="unknown_parameter")

    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a non-empty string", param="model")
    if model not in model_names:
        raise ApiError(404, f"model {ascii(model)} does not exist; served: {sorted(model_names)}", param="model",
                       code="model_not_found")

    if "input" not in data:
        raise ApiError(400, "'input' is required: a string or a list of strings", param="input")
    raw = data["input"]
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list):
        if not raw:
            raise ApiError(400, "'input' is an empty list; send at least one string", param="input")
        bad = next((i for i, t in enumerate(raw) if not isinstance(t, str)), None)
        if bad is not None:
            hint = " (token arrays are not accepted; send text)" if isinstance(raw[bad], (int, list)) else ""
            raise ApiError(400, f"'input[{bad}]' is {type(raw[bad]).__name__}; every input must be a string{hint}",
                           param=f"input[{bad}]")
        texts = raw
    else:
        raise ApiError(400, f"'input' must be a string or a list of strings, got {type(raw).__name__}", param="input")
    if len(texts) > max_inputs:
        raise ApiError(400, f"'input' has {len(texts)} items; the limit is {max_inputs}", param="input",
                       code="too_many_inputs")

    fmt = data.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', got {ascii(fmt)[:100]}",
                       param="encoding_format")

    dims = data.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= dimension):
        raise ApiError(400, f"'dimensions' must be an integer from 1 to {dimension}, got {ascii(dims)[:100]}",
                       param="dimensions")

    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", param="user")
    instruction = data.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise ApiError(400, "'instruction' must be a string (the task, for queries) or absent (documents)",
                       param="instruction")
    return EmbeddingRequest(texts, model, fmt, dims, instruction or None)


def shape_vectors(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka truncation: keep the first ``dimensions`` values and re-normalise."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    return cut / np.clip(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12, None)


def embedding_response(vectors: np.ndarray, fmt: str, model: str, prompt_tokens: int) -> bytes:
    """The response body, serialised by orjson straight from the float32 rows (no Python float per element)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if fmt == "base64":
        rows: list[Any] = [base64.b64encode(vector.tobytes()).decode() for vector in vectors]
    else:
        rows = list(vectors)
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


# ---- the OpenAPI description (GET /openapi.json): the schema parse_request enforces --------------------------
def openapi_request_body() -> dict[str, Any]:
    """The request body as parse_request accepts it (limits that depend on the served model are stated in words)."""
    text = {"type": "string", "description": "valid Unicode (no lone surrogates)"}
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["input", "model"],
        "properties": {
            "input": {"anyOf": [text, {"type": "array", "items": text, "minItems": 1}],
                      "description": "a text or a non-empty list of texts (at most serve.max_inputs_per_request); "
                                     "token arrays are not accepted"},
            "model": {"type": "string", "minLength": 1,
                      "description": "serve.model_name, or the served model reference; another name gets 404"},
            "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
            "dimensions": {"type": "integer", "minimum": 1,
                           "description": "Matryoshka truncation, at most the model's dimension"},
            "user": {"type": "string"},
            "instruction": {"type": "string", "description": "ray-e5 extension: the task, for queries"},
        },
    }
    return {"required": True, "content": {"application/json": {"schema": schema}},
            "description": f"UTF-8 JSON without a BOM, uncompressed; nesting at most {MAX_JSON_DEPTH} deep, "
                           f"number literals at most {MAX_NUMBER_CHARS} characters, no duplicate keys"}


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}

EMBEDDINGS_SCHEMA = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": {
            "type": "object", "required": ["object", "index", "embedding"],
            "properties": {"object": {"type": "string"}, "index": {"type": "integer"},
                           "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                                   {"type": "string"}]}}}},
        "model": {"type": "string"},
        "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                   "total_tokens": {"type": "integer"}}},
    },
}

_ERRORS = {400: "malformed request", 401: "missing or invalid API key", 404: "unknown model",
           408: "body not received within serve.body_read_timeout_s",
           413: "body, input or request tokens (serve.max_tokens_per_request) too large", 415: "wrong Content-Type or Content-Encoding",
           429: "queue full: retry after Retry-After", 500: "internal error (JSON, with a request id)",
           504: "not answered within serve.request_timeout_s"}


def openapi_responses() -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        200: {"description": "embeddings", "content": {"application/json": {"schema": EMBEDDINGS_SCHEMA}}}}
    for status, text in _ERRORS.items():
        out[status] = {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    return out
