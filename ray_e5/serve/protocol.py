"""The OpenAI embeddings protocol: parse and validate a raw request body, shape responses and errors.

Parsing is done by hand from bytes (not by FastAPI's body model) so that every malformed request, whatever its
shape, gets a 4xx with an OpenAI-style error naming the parameter, and none reaches the model.
"""

from __future__ import annotations

import base64
import json
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


def parse_request(body: bytes, *, max_body_bytes: int, max_inputs: int, dimension: int,
                  model_names: set[str]) -> EmbeddingRequest:
    if len(body) > max_body_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {max_body_bytes}", code="body_too_large")
    if not body.strip():
        raise ApiError(400, "request body is empty; send a JSON object with 'input' and 'model'", code="empty_body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {err.start})", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_body")
    unknown = sorted(set(data) - _ALLOWED)
    if unknown:
        raise ApiError(400, f"unknown parameter(s) {unknown}; accepted: {sorted(_ALLOWED)}", param=unknown[0],
                       code="unknown_parameter")

    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a non-empty string", param="model")
    if model not in model_names:
        raise ApiError(404, f"model {model!r} does not exist; served: {sorted(model_names)}", param="model",
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
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format")

    dims = data.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= dimension):
        raise ApiError(400, f"'dimensions' must be an integer from 1 to {dimension}, got {dims!r}",
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
