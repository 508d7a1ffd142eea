"""The Embedder every stage shares: backbones, EOS-safe tokenisation, pooling, LoRA, save/load, export."""

from ray_e5.model.embedder import Embedder, is_embedder_dir
from ray_e5.model.references import ACCEPTED_FORMS, UnknownModelError, resolve_backbone

__all__ = ["Embedder", "is_embedder_dir", "ACCEPTED_FORMS", "UnknownModelError", "resolve_backbone"]
