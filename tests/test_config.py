"""Config: YAML + dotted overrides, unknown keys refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_e5.config import ConfigError, ModelSettings, RayE5Config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\nmodel:\n  name: minilm-l6\n  max_length: 64\n")
    cfg = load_config(path, ["model.max_length=32", "model.lora.r=8", "model.normalize=false"])
    assert cfg.run_dir == "runs/x" and cfg.model.name == "minilm-l6"
    assert cfg.model.max_length == 32 and cfg.model.lora.r == 8 and cfg.model.normalize is False


@pytest.mark.parametrize("overrides, key", [
    (["model.polling=last"], "model.polling: unknown key"),
    (["model.pooling=max"], "model.pooling"),
    (["model.max_length=0"], "model.max_length"),
    (["model.lora.dropout=2"], "model.lora.dropout"),
    (["nonsense=1"], "nonsense: unknown key"),
])
def test_bad_keys_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["model.name"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_stage_sections_name_their_keys():
    cfg = RayE5Config.model_validate({"train": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"train\.bogus: unknown key"):
        cfg.section("train", ModelSettings)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "serve.yaml"))
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.name
