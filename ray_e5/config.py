"""The whole config of a run: :class:`RayE5Config`, composed here from the section every stage owns.

Each stage owns its section model (``ray_e5/<stage>/config.py``, a :class:`~ray_e5.settings.Section`); this module
puts them together as typed fields, so validating a config validates every section with it and pydantic reports
every error of every section at once, each named by its dotted key (``train.lr: ...``, ``serve.port: ...``),
before any stage runs or Ray starts: a typo in the last stage must not cost the hours of the first. A config is
loaded from YAML and then overridden from the command line with dotted ``key=value`` pairs (``train.lr=2e-4``).

The layers, lowest first: :mod:`ray_e5.settings` (imports nothing of ray_e5) <- the stage settings modules <- this
module <- the stages' code <- the stage registry (:mod:`ray_e5.stages`) and the commands. This module imports
neither the registry nor any stage's code, and the commands find here what they need (the base's names are
re-exported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError, model_validator

from ray_e5.embed.config import EmbedSettings
from ray_e5.evaluate.config import EvaluateSettings
from ray_e5.generate.config import GenerateSettings
from ray_e5.serve.config import ServeSettings
from ray_e5.settings import (BudgetShares, ConfigError, LoraSettings, ModelSettings, Section, apply_overrides,
                             error_lines, read_yaml, validate)
from ray_e5.train.config import TrainSettings

__all__ = ["RayE5Config", "SECTIONS", "load_config", "check_config", "check_sections", "ConfigError", "Section",
           "ModelSettings", "LoraSettings", "BudgetShares", "apply_overrides", "read_yaml", "validate"]

C = TypeVar("C", bound=BaseModel)

#: the stage sections, in pipeline order (the registry, ray_e5/stages.py, names the same stages in the same order)
SECTIONS: dict[str, type[Section]] = {"generate": GenerateSettings, "train": TrainSettings,
                                      "evaluate": EvaluateSettings, "serve": ServeSettings}


class RayE5Config(Section):
    """The whole run: one run directory, one data directory, one Ray address, one section per stage.

    A stage section left out (or written empty, ``train:``) takes its settings' defaults; whether the user wrote it
    is :meth:`has_section`. Building one from data (``model_validate``, as :func:`load_config` does) raises a
    :class:`ConfigError` listing every error with its dotted key.
    """

    run_dir: str = "runs/default"
    # Inputs (labeled sources, evaluation task folders, contamination sets) are named relative to data_dir; it,
    # run_dir and any path may be local or s3:// / gs:// (endpoint and credentials from the AWS_* variables).
    # A relative local data_dir is taken from the driver's current directory (the project root for the recipes).
    data_dir: str = "../shared/data"
    ray_address: str | None = None  # None: start or join a local cluster
    budget: BudgetShares = Field(default_factory=BudgetShares)  # the quickstart's time shares
    model: ModelSettings = Field(default_factory=ModelSettings)
    # the stage sections, in pipeline order (the order their errors are listed in)
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    # not a stage: `ray-e5 embed --input ... --output ...` (a corpus embedded offline), validated with the others
    embed: EmbedSettings = Field(default_factory=EmbedSettings)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> "RayE5Config":
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise ConfigError(error_lines(err)) from None

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_absent(cls, data: Any) -> Any:
        # `train:` with nothing under it is YAML's null: the section's defaults, as when it is left out
        if isinstance(data, dict) and any(data.get(name, {}) is None for name in SECTIONS):
            data = {k: v for k, v in data.items() if not (k in SECTIONS and v is None)}
        return data

    def has_section(self, name: str) -> bool:
        """Whether the config gave the stage section ``name`` (else it holds the stage's defaults)."""
        return name in self.model_fields_set

    def section(self, name: str, cls: type[C]) -> C:
        """The section ``name`` as ``cls`` (a copy: what the caller changes stays out of the config).

        The stage sections are validated with the config; asked as another class, the section's keys are validated
        as that class, errors named ``name.key``."""
        value = getattr(self, name)
        if isinstance(value, cls):
            return value.model_copy(deep=True)
        data = value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else dict(value or {})
        return validate(cls, data, prefix=f"{name}.")


def check_sections(config: RayE5Config) -> RayE5Config:
    """Validate every stage section of ``config`` again from the keys it holds (a config assembled without
    validation, ``model_construct``, or changed since); raise one ConfigError that lists every error of every
    section. Returns ``config`` unchanged."""
    errors: list[str] = []
    for name, cls in SECTIONS.items():
        value = getattr(config, name, None)
        data = value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value
        if not isinstance(data, dict):  # absent (the defaults apply)
            continue
        try:
            validate(cls, data, prefix=f"{name}.")
        except ConfigError as err:
            errors.extend(err.errors)
    if errors:
        raise ConfigError(errors)
    return config


def check_config(data: dict[str, Any], cls: type[C] = RayE5Config) -> C:
    """Build ``cls`` from ``data``, every stage section with it; every error of the top level and of every section
    is reported in one ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(error_lines(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type[C] = RayE5Config) -> C:
    """Load a config from YAML (or defaults), apply overrides, validate the whole of it (every stage section)."""
    data = read_yaml(path) if path is not None else {}
    return check_config(apply_overrides(data, overrides), cls)
