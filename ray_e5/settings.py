"""The base of every config: what each section is built from, and how a config becomes values or errors.

:class:`Section` (unknown keys are errors), :class:`ConfigError` (every problem named by its dotted key), the
``model:`` settings every stage shares, the quickstart's time shares, and the generic steps from YAML and
``--set key=value`` overrides to validated sections. It imports nothing of ray_e5, so that every module, from the
run directory's file access to the stage settings and :mod:`ray_e5.config` (which composes the sections into one
config), can import it without an import cycle.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key and what is accepted.

    ``errors`` holds one line per problem (``train.lr: Input should be a valid number (got 'abc')``); a config
    with several problems raises one ConfigError listing all of them, as torchtune's ConfigError collects them.
    """

    def __init__(self, message: "str | Iterable[str]"):
        self.errors: list[str] = [message] if isinstance(message, str) else list(message)
        if len(self.errors) == 1:
            text = self.errors[0]
        else:
            text = f"{len(self.errors)} errors in the config:\n" + "\n".join(f"  {e}" for e in self.errors)
        super().__init__(text)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # A section is written as a mapping in YAML, and code and tests written against that mapping read and set it
    # by key (``config.train["max_time_s"]``, ``config.generate["base_url"] = url``); both go through the fields,
    # so a value set by key is validated as one set by attribute.
    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in type(self).model_fields:
            raise KeyError(key)
        setattr(self, key, value)


class LoraSettings(Section):
    """LoRA through peft. Defaults follow the paper: r=16, alpha=32, dropout 0.1, every linear projection."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Adapt only the last N transformer layers (None: all). Autograd then stops at the lowest adapted layer, so a
    # step costs a full forward but only N layers of backward: more steps in a CPU hour (measured in the README).
    top_layers: int | None = Field(None, gt=0)


class ModelSettings(Section):
    """How to build the Embedder: which backbone, how to pool, which template for queries.

    ``name`` is this section's model reference (``model.name``: the base model), what the other sections spell
    ``model`` (``generate.model``, ``serve.model``, ``train.mine.model``, ``evaluate.models[].model``); it keeps
    its name because ``model.model`` would say nothing more."""

    name: str = "gemma3-270m"
    pooling: Literal["last", "mean", "cls"] | None = None  # None: the backbone's natural pooling
    normalize: bool = True
    max_length: int = Field(512, gt=1)  # refused at load above the backbone's limit (max_position_embeddings)
    # Long context (E5-mistral section 5.2), set on the backbone's HF config before the weights load, saved in
    # ray_e5.json and in an export's config.json. None keeps the checkpoint's own value.
    rope_theta: float | None = Field(None, gt=0)  # RoPE base; Gemma 3: its global (full-attention) layers
    sliding_window: int | None = Field(None, gt=0)  # attention window: Mistral's; Gemma 3's local layers
    instruction_template: str = "Instruct: {task}\nQuery: {text}"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Keep only the first N decoder layers (ray_e5/model/depth.py); None keeps them all
    num_layers: int | None = Field(None, gt=0)
    # Every token attends to every other (Gemma 3's use_bidirectional_attention, as EmbeddingGemma ships): an
    # encoder's attention on a decoder's weights; for backbones with that flag only, best with mean pooling
    bidirectional: bool = False
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None


class BudgetShares(Section):
    """How ``ray-e5 quickstart --budget-min M`` shares its time out: the fractions of M given to generation
    (``generate.time_budget_s``) and to training (``train.max_time_s``), each a cap on what the section says. The
    rest goes to starting up, evaluation (sized by the evaluate section's task limits) and serving."""

    generate: float = Field(0.3, ge=0.0, le=1.0)
    train: float = Field(0.4, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _fits(self) -> "BudgetShares":
        if self.generate + self.train > 0.95:
            raise ValueError(f"generate ({self.generate}) + train ({self.train}) leave no time to evaluate and "
                             "serve; their sum must be at most 0.95")
        return self


C = TypeVar("C", bound=BaseModel)


# Keys whose values are secrets: an error about one names the key and what is accepted, never the value given.
_SECRET_KEY = re.compile(r"api_?key|token|secret|password|passwd|credential", re.IGNORECASE)


def error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per error of ``err``, each named by its dotted key (under ``prefix``); a secret's value is never
    shown."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}{key}" if key else prefix.rstrip(".") or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif _SECRET_KEY.search(key):
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')} (the value given is a secret: not shown)")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # a check across a whole (sub)section: its message says what is wrong; the input is the section itself
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            got = repr(e.get("input"))
            lines.append(f"{key}: {e['msg']} (got {got if len(got) <= 120 else got[:117] + '...'})")
    return lines


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c``; a number steps into a list (``train.sources.3.weight``: the fourth source's weight)."""
    parts = dotted.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(f"{dotted}: {part!r} is not an index of {'.'.join(parts[:depth])}, a list of "
                                  f"{len(node)} (0 to {len(node) - 1})")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{dotted}: cannot set a key under {parts[depth - 1]!r}, which holds {node!r}")
        if last:
            node[part] = value
            return
        child = node[part] if isinstance(node, list) else node.get(part)
        if child is None:
            child = node[part] = {}
        node = child


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; values are parsed as YAML scalars (``3``, ``true``, ``[a, b]``)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        _set_dotted(data, key, yaml.safe_load(raw) if raw != "" else "")
    return data


def validate(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build ``cls`` from ``data``; a validation error becomes a ConfigError naming each bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(error_lines(err, prefix)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data
