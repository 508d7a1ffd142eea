"""Encoding through a running Serve deployment (any OpenAI-compatible ``/v1/embeddings`` server) over HTTP.

The OpenAI embeddings API has no instruction field, so queries are wrapped in the instruction template here, on
the client, exactly as the Embedder would wrap them; the server embeds the text it is given.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ray_e5.model.instructions import DEFAULT_TEMPLATE, format_query


class EndpointEmbedder:
    """An Embedder look-alike (``encode``, ``name``, ``dimension``) backed by an embeddings endpoint."""

    def __init__(self, base_url: str, model: str, instruction_template: str | None = None,
                 timeout: float = 120.0, max_retries: int = 3):
        from openai import OpenAI

        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self.name = model
        self.template = instruction_template or DEFAULT_TEMPLATE
        self.client = OpenAI(base_url=self.base_url, api_key="ray-e5", timeout=timeout, max_retries=max_retries)
        self._dimension: int | None = None

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self._dimension = int(self.encode(["dimension probe"]).shape[1])
        return self._dimension

    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32) -> np.ndarray:
        texts = [format_query(t, instruction, self.template) for t in texts]
        out: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            reply = self.client.embeddings.create(model=self.name, input=chunk, encoding_format="float")
            rows = sorted(reply.data, key=lambda d: d.index)
            if len(rows) != len(chunk):
                raise RuntimeError(f"{self.base_url}/embeddings returned {len(rows)} vectors for {len(chunk)} inputs")
            out.append(np.asarray([r.embedding for r in rows], dtype=np.float32))
        if not out:
            return np.zeros((0, self._dimension or 0), dtype=np.float32)
        vectors = np.concatenate(out)
        self._dimension = vectors.shape[1]
        return vectors
