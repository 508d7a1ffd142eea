"""Long-context settings on a backbone's HF config: the RoPE base, the attention window, the length limit.

transformers 5 keeps the RoPE base in ``config.rope_parameters``: one dict for Mistral/Llama-style models
(``{"rope_type": "default", "rope_theta": 1e6}``) and one dict per attention kind for Gemma 3
(``{"full_attention": {...}, "sliding_attention": {...}}``, the global layers at 1e6 and the local ones at 1e4).
``model.rope_theta`` sets the base of a single-dict model and of Gemma 3's global layers (the local layers see at
most ``sliding_window`` tokens, so their base does not limit the context). ``model.sliding_window`` sets
``config.sliding_window``: Mistral's window on every layer, Gemma 3's window on its local layers.
"""

from __future__ import annotations

from typing import Any

from ray_e5.settings import ConfigError

#: encoders whose position table reserves slots for the padding offset
_OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}


def _describe(config, name: str) -> str:
    return f"{name!r} (model_type {getattr(config, 'model_type', '?')})"


def length_limit(config) -> int | None:
    """The most tokens the backbone's positions cover, or None when its config does not say."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    return limit - _OFFSET_POSITIONS.get(getattr(config, "model_type", ""), 0)


def rope_theta(config) -> float | None:
    """The RoPE base ``model.rope_theta`` acts on (Gemma 3: the global layers'), or None without RoPE."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        if "rope_theta" in params:
            return float(params["rope_theta"])
        full = params.get("full_attention")
        if isinstance(full, dict) and "rope_theta" in full:
            return float(full["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_bidirectional_attention", False):
        window = (window - 1) * 2  # Gemma 3 keeps an exclusive half-window internally in that mode
    return window


def apply_long_context(config, settings, name: str) -> Any:
    """Set ``settings.rope_theta`` / ``settings.sliding_window`` on ``config`` (in place) and check
    ``settings.max_length`` against the backbone's limit; raise ConfigError naming the key otherwise."""
    errors = []
    if settings.rope_theta is not None:
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and "rope_theta" in params:
            config.rope_parameters = {**params, "rope_theta": float(settings.rope_theta)}
        elif isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
            config.rope_parameters = {**params, "full_attention": {**params["full_attention"],
                                                                   "rope_theta": float(settings.rope_theta)}}
        elif getattr(config, "rope_theta", None) is not None:
            config.rope_theta = float(settings.rope_theta)
        else:
            errors.append(f"model.rope_theta: the backbone {_describe(config, name)} has no rotary position "
                          "embeddings to set a base for; remove model.rope_theta")
    if settings.sliding_window is not None:
        if not hasattr(config, "sliding_window"):
            errors.append(f"model.sliding_window: the backbone {_describe(config, name)} has no sliding-window "
                          "attention; remove model.sliding_window")
        else:
            window = int(settings.sliding_window)
            if getattr(config, "use_bidirectional_attention", False):
                window = window // 2 + 1  # as Gemma3TextConfig.__post_init__ converts it
            config.sliding_window = window
    limit = length_limit(config)
    if limit is not None and settings.max_length > limit:
        errors.append(f"model.max_length: {settings.max_length} exceeds the limit of the backbone "
                      f"{_describe(config, name)}: {limit} tokens (max_position_embeddings); "
                      f"use model.max_length <= {limit}")
    if errors:
        raise ConfigError(errors)
    return config
