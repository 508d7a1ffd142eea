"""Encoding through a running Serve deployment (or any OpenAI-compatible ``/v1/embeddings`` server) over HTTP.

The OpenAI embeddings API has no instruction field. ray-e5's Serve app accepts an ``instruction`` extension
parameter and wraps queries in its own model's template (``instruction_mode: server``, the default); for any
other server, ``instruction_mode: client`` wraps them here in ``instruction_template`` and sends plain text.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ray_e5.model.template import DEFAULT_TEMPLATE, format_query


class EndpointEmbedder:
    """An Embedder look-alike (``encode``, ``name``, ``dimension``) backed by an embeddings endpoint."""

    def __init__(self, base_url: str, model: str, instruction_template: str | None = None,
                 instruction_mode: str = "server", api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 3):
        import os

        from openai import OpenAI

        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self.name = model
        self.template = instruction_template or DEFAULT_TEMPLATE
        self.server_instructions = instruction_mode == "server"
        api_key = api_key or os.environ.get("RAY_E5_API_KEY") or "unused"
        self.client = OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._dimension: int | None = None

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self._dimension = int(self.encode(["dimension probe"]).shape[1])
        return self._dimension

    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32) -> np.ndarray:
        extra = None
        if instruction and self.server_instructions:
            extra = {"instruction": instruction}
        else:
            texts = [format_query(t, instruction, self.template) for t in texts]
        out: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            reply = self.client.embeddings.create(model=self.name, input=chunk, encoding_format="float",
                                                  extra_body=extra)
            rows = sorted(reply.data, key=lambda d: d.index)
            if len(rows) != len(chunk):
                raise RuntimeError(f"{self.base_url}/embeddings returned {len(rows)} vectors for {len(chunk)} inputs")
            out.append(np.asarray([r.embedding for r in rows], dtype=np.float32))
        if not out:
            return np.zeros((0, self._dimension or 0), dtype=np.float32)
        vectors = np.concatenate(out)
        self._dimension = vectors.shape[1]
        return vectors
