"""Keep only the first ``model.num_layers`` decoder layers of a backbone.

A small decoder's last layers specialise in predicting the next token: on base Gemma 3 270M the vectors mean-pooled
from its 14th layer score 65.2 on STS-B dev, from its last (18th) 56.1 (bench/probe_depth.py). Cutting the model there gives fine-tuning a better
start and makes every forward and backward step cheaper (14 of 18 layers: 0.78 of the compute). It is set on the
HF config before the weights load, so the unused layers are never built; the saved ``ray_e5.json`` and an export's
``config.json`` both carry the cut depth, so evaluation, serving and sentence-transformers see the same model.
"""

from __future__ import annotations

import contextlib
import logging

from ray_e5.settings import ConfigError


def _text_config(config):
    return getattr(config, "text_config", None) or config


def depth(config) -> int | None:
    """How many decoder layers the backbone has, or None when its config does not say."""
    layers = getattr(_text_config(config), "num_hidden_layers", None) if config is not None else None
    return int(layers) if isinstance(layers, int) and layers > 0 else None


def keep_first_layers(config, num_layers: int | None, name: str):
    """Set ``config`` (in place) to build the first ``num_layers`` layers; raise ConfigError naming
    ``model.num_layers`` when the backbone has fewer or does not say how many it has."""
    if num_layers is None:
        return config
    text = _text_config(config)
    layers = depth(config)
    if layers is None:
        raise ConfigError([f"model.num_layers: the backbone {name!r} does not say how many layers it has "
                           "(no num_hidden_layers in its config); remove model.num_layers"])
    if num_layers > layers:
        raise ConfigError([f"model.num_layers: {num_layers} is more than the {layers} layers of the backbone "
                           f"{name!r}; use 1..{layers}, or leave it unset for all of them"])
    text.num_hidden_layers = num_layers
    layer_types = getattr(text, "layer_types", None)
    if isinstance(layer_types, list):  # Gemma 3, Qwen 3: one attention kind per layer
        text.layer_types = layer_types[:num_layers]
    return config


class _CutLayersReport(logging.Filter):
    """Drop transformers' load report when all it says is that checkpoint weights went unused (the cut layers'):
    a report that also names missing or mismatched weights still reaches the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("LOAD REPORT" in message and "UNEXPECTED" in message
                    and "MISSING" not in message and "MISMATCH" not in message)


@contextlib.contextmanager
def quiet_cut_layers(num_layers: int | None):
    """While loading a cut backbone, leave out the table of the cut layers' weights (hundreds of lines)."""
    if num_layers is None:
        yield
        return
    logger, report = logging.getLogger("transformers.modeling_utils"), _CutLayersReport()
    logger.addFilter(report)
    try:
        yield
    finally:
        logger.removeFilter(report)
