"""The mteb 2.x encoder around an Embedder (or a Serve endpoint): the E5 instructions, a filled ModelMeta.

mteb hands ``encode`` a DataLoader of batches (``batch["text"]`` holds the texts, for corpora title and body
already joined), the task's metadata and a ``prompt_type`` (query / document, set by retrieval-like tasks).
Queries of retrieval-like tasks get the task's instruction in the E5 template and documents none; every input of
every other task type gets it, as the official E5 evaluation does.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from ray_e5.evaluate.instructions import instructs_documents, task_instruction

log = logging.getLogger(__name__)


class TextEncoder(Protocol):
    """What the encoder needs from a model: an Embedder or an :class:`~ray_e5.evaluate.endpoint.EndpointEmbedder`."""

    name: str

    @property
    def dimension(self) -> int: ...

    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32) -> np.ndarray: ...


class TruncatedModel:
    """A model whose vectors are cut to the first ``dimension`` components and re-normalised (Matryoshka
    evaluation, ``evaluate.dimensions``); everything else is the wrapped model's."""

    def __init__(self, model: TextEncoder, dimension: int):
        full = int(model.dimension)
        if not 0 < int(dimension) <= full:
            raise ValueError(f"evaluate.dimensions: {dimension} is not a width of model {model.name!r}, "
                             f"whose vectors have {full} dimensions")
        self.model = model
        self.dimension = int(dimension)
        self.full_dimension = full

    def __getattr__(self, name: str) -> Any:  # name, settings, tokenizer, parameters of the wrapped model
        return getattr(self.__dict__["model"], name)

    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32) -> np.ndarray:
        vectors = np.asarray(self.model.encode(texts, instruction=instruction, batch_size=batch_size),
                             dtype=np.float32)[:, :self.dimension]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


def wants_instructions(model: Any) -> bool:
    """``instructions: auto``: on for last-token (E5-style decoder) models, off for encoders trained without them."""
    settings = getattr(model, "settings", None)
    return getattr(settings, "pooling", "last") == "last"


def model_meta(model: TextEncoder, label: str, use_instructions: bool, revision: str = "local") -> ModelMeta:
    settings = getattr(model, "settings", None)
    return ModelMeta(
        loader=None,
        name=f"ray-e5/{label}".replace(" ", "_"),
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=_n_parameters(model),
        memory_usage_mb=None,
        max_tokens=getattr(settings, "max_length", None),
        embed_dim=model.dimension,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch"],
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=use_instructions,
        training_datasets=None,
        adapted_from=getattr(model, "name", None),
    )


def _n_parameters(model: Any) -> int | None:
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    try:
        return int(sum(p.numel() for p in params()))
    except Exception:  # noqa: BLE001 - a count is informational only
        return None


class E5Encoder(AbsEncoder):
    """mteb encoder for ray-e5 models.

    ``use_instructions=False`` encodes every text as it is (for baselines trained without instructions, and for
    comparing with mteb run directly on a sentence-transformers model). ``instructions`` overrides the table per
    task name.
    """

    def __init__(self, model: TextEncoder, label: str | None = None, use_instructions: bool | None = None,
                 instructions: Mapping[str, str] | None = None, revision: str = "local"):
        self.model = model
        self.use_instructions = wants_instructions(model) if use_instructions is None else bool(use_instructions)
        self.overrides = dict(instructions or {})
        self.mteb_model_meta = model_meta(model, label or str(model.name), self.use_instructions, revision)
        self.seen: dict[str, str | None] = {}  # task/prompt type -> instruction used, for the report

    def instruction(self, task_metadata, prompt_type: PromptType | None) -> str | None:
        """The instruction for one encode call, or None (documents of retrieval tasks, or instructions off)."""
        if not self.use_instructions:
            return None
        if prompt_type == PromptType.document and not instructs_documents(task_metadata.type):
            return None
        hint = task_metadata.prompt
        if isinstance(hint, dict):
            hint = hint.get(PromptType.query.value)
        return task_instruction(task_metadata.name, task_metadata.type, hint, self.overrides)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        instruction = self.instruction(task_metadata, prompt_type)
        key = f"{task_metadata.name}:{prompt_type.value if prompt_type else 'all'}"
        if key not in self.seen:
            self.seen[key] = instruction
            log.info("encoding %s (%s) with instruction %r", task_metadata.name, key, instruction)
        return self.model.encode(texts, instruction=instruction, batch_size=int(kwargs.get("batch_size") or 32))
