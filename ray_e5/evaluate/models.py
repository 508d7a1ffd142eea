"""Resolving the configured models and building them (in the process that encodes)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_e5.digest import digest
from ray_e5.config import ConfigError, RayE5Config
from ray_e5.evaluate.config import EvaluateSettings, ModelEntry

_OVERRIDES = ("pooling", "max_length", "dtype", "normalize", "rope_theta", "sliding_window")


@dataclass
class ModelSpec:
    label: str
    ref: str
    overrides: dict[str, Any] = field(default_factory=dict)
    instructions: bool | None = None  # None: auto
    endpoint: str | None = None
    instruction_template: str | None = None
    instruction_mode: str = "server"
    dimension: int | None = None  # evaluate.dimensions: vectors cut to this width and re-normalised
    parent: str | None = None  # the full-width model's label, for a truncated variant

    @property
    def model_key(self) -> str:
        """Changes when the loaded model does (not with the width it is cut to): workers reuse a loaded model
        across the widths of ``evaluate.dimensions``."""
        key = {"ref": self.ref, "overrides": self.overrides, "instructions": self.instructions,
               "endpoint": self.endpoint, "template": self.instruction_template, "mode": self.instruction_mode,
               "files": _dir_stats(self.ref)}
        return digest(key)

    @property
    def fingerprint(self) -> str:
        """Changes when the model does: its reference, overrides, for a local directory its files; its width."""
        if self.dimension is None:
            return self.model_key
        return digest({"model": self.model_key, "dimension": self.dimension})

    def build(self, base=None):
        """The encoding model: an Embedder, or an EndpointEmbedder in Serve mode; cut to ``dimension`` when set
        (``base``: the already loaded full-width model)."""
        model = base if base is not None else self.build_base()
        if self.dimension is not None:
            from ray_e5.evaluate.encoder import TruncatedModel

            return TruncatedModel(model, self.dimension)
        return model

    def build_base(self):
        if self.endpoint:
            from ray_e5.evaluate.endpoint import EndpointEmbedder

            return EndpointEmbedder(self.endpoint, self.ref, self.instruction_template, self.instruction_mode)
        from ray_e5.model import Embedder

        from ray_e5 import storage
        from ray_e5.model.precision import inference_dtype

        overrides = dict(self.overrides)
        if "dtype" in overrides:  # resolved here, on the node that encodes
            overrides["dtype"] = inference_dtype(overrides["dtype"])
        # A LoRA adapter is merged into the weights it adapts: the same vectors (within fp32 rounding), 1.2x faster
        # (the one-hour recipe's trained model: 357 s unmerged, 303 s merged)
        return Embedder.load(storage.local_copy(self.ref), merge_lora=True, **overrides)


def _dir_stats(ref: str) -> list | None:
    """The files of a model directory (names, sizes, modification times): local, or the listing of a URI (an
    ``s3://`` embedder rewritten by a new training run lists differently, so its cached scores are not reused)."""
    if "://" in ref:
        from ray_e5 import storage

        try:
            return storage.listing(ref)
        except OSError:
            return None
    path = Path(ref)
    if not path.is_dir():
        return None
    return [(str(p.relative_to(path)), p.stat().st_size, int(p.stat().st_mtime))
            for p in sorted(path.rglob("*")) if p.is_file()]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def default_label(ref: str) -> str:
    """``runs/x/embedder`` -> ``x-embedder``; ``org/name`` or a path -> its last part."""
    from ray_e5.rundir import EMBEDDER_DIR

    path = Path(ref.rstrip("/"))
    if path.name == EMBEDDER_DIR and path.parent.name:
        return f"{path.parent.name}-embedder"
    return path.name or ref


def resolve_models(config: RayE5Config, settings: EvaluateSettings) -> list[ModelSpec]:
    entries = list(settings.models)
    if not entries:
        from ray_e5.rundir import RunDir

        embedder = RunDir.of(config.run_dir).trained_embedder()  # wherever it lives (local or a URI)
        if embedder is not None:
            entries = [ModelEntry(model=embedder, label="trained")]
        else:
            m = config.model
            entries = [ModelEntry(model=m.name, label=m.name, pooling=m.pooling, max_length=m.max_length,
                                  dtype=m.dtype, normalize=m.normalize, rope_theta=m.rope_theta,
                                  sliding_window=m.sliding_window)]
    specs = []
    for i, entry in enumerate(entries):
        ref = entry.model.replace("{run_dir}", config.run_dir.rstrip("/"))
        overrides = {k: getattr(entry, k) for k in _OVERRIDES if getattr(entry, k) is not None}
        specs.append(ModelSpec(label=entry.label or default_label(ref), ref=ref, overrides=overrides,
                               instructions=None if entry.instructions == "auto" else entry.instructions,
                               endpoint=entry.endpoint, instruction_template=entry.instruction_template,
                               instruction_mode=entry.instruction_mode))
    if settings.dimensions:
        specs = [variant for spec in specs for variant in
                 [spec] + [ModelSpec(**{**spec.__dict__, "label": f"{spec.label}@{d}", "dimension": d,
                                        "parent": spec.label}) for d in sorted(settings.dimensions)]]
    labels = [s.label for s in specs]
    for label in labels:
        if labels.count(label) > 1:
            raise ConfigError(f"evaluate.models: two models are labelled {label!r}; give each a distinct `label`")
    return specs
