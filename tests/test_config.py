"""Config: YAML + dotted overrides, unknown keys refused with the key named; the whole config (every stage section)
validated when it is loaded, every error reported at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ray_e5.config import ConfigError, ModelSettings, RayE5Config, check_sections, load_config
from ray_e5.stages import STAGES

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


def test_an_override_steps_into_a_list_by_index():
    cfg = load_config(CONFIGS / "cpu-1h.yaml", ["train.sources.3.weight=0.25", "train.sources.-1.weight=0.4"])
    sources = cfg.train["sources"]
    assert sources[3]["path"].startswith("snli_triplets") and sources[3]["weight"] == 0.25
    assert sources[-1]["weight"] == 0.4 and sources[0]["weight"] == 0.3  # the others as they were
    for bad in ("train.sources.9.weight=1", "train.sources.snli.weight=1"):
        with pytest.raises(ConfigError, match=r"is not an index of train\.sources, a list of 6 \(0 to 5\)"):
            load_config(CONFIGS / "cpu-1h.yaml", [bad])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["model.name"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_stage_sections_name_their_keys():
    with pytest.raises(ConfigError, match=r"train\.bogus: unknown key"):
        RayE5Config.model_validate({"train": {"bogus": 1}}).section("train", ModelSettings)


RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "serve.yaml")  # serve.yaml: Ray's deploy schema
SINGLE_STAGE = {"multilingual-eval.yaml"}  # an evaluation recipe: the other stages keep their defaults


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_configs_load_with_every_section_validated(name, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # e5-mistral-7b generates with the openai backend
    cfg = load_config(CONFIGS / name)
    assert cfg.model.name
    present = [stage.name for stage in STAGES.values() if getattr(cfg, stage.name) is not None]
    if name not in SINGLE_STAGE:  # a whole recipe configures every stage
        assert present == list(STAGES), f"{name} lacks a section for {set(STAGES) - set(present)}"
    assert present, f"{name} configures no stage"
    for stage in STAGES.values():  # each section builds its settings class (what the stage itself will do)
        assert isinstance(cfg.section(stage.name, stage.settings_class()), stage.settings_class())


# A typo in any section of any shipped config fails load_config, naming the dotted key (nothing has run yet).
TYPOS = {"generate": ("generate.num_exmples=3", "generate.num_exmples: unknown key"),
         "train": ("train.lr=abc", "train.lr: Input should be a valid number"),
         "evaluate": ("evaluate.x=1", "evaluate.x: unknown key"),
         "serve": ("serve.prot=1", "serve.prot: unknown key")}


def test_every_stage_has_a_typo_case():
    assert set(TYPOS) == set(STAGES)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("stage", sorted(TYPOS))
def test_a_typo_in_any_section_fails_load_config(name, stage, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    override, message = TYPOS[stage]
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(CONFIGS / name, [override])
    assert info.value.errors == [e for e in info.value.errors if e.startswith(f"{stage}.")] and len(info.value.errors) == 1


def test_every_error_of_every_section_is_reported_at_once():
    overrides = [override for override, _ in TYPOS.values()] + ["model.pooling=max", "bogus=1"]
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "quickstart.yaml", overrides)
    errors = info.value.errors
    assert len(errors) == 6, errors
    for _, message in TYPOS.values():
        assert any(e.startswith(message) for e in errors), (message, errors)
    assert "model.pooling" in str(info.value) and "bogus: unknown key" in str(info.value)
    assert str(info.value).startswith("6 errors in the config:")


def test_section_that_is_not_a_mapping_is_named():
    with pytest.raises(ConfigError, match=r"train: Input should be a valid dictionary"):
        load_config(None, ["train=3"])


def test_check_sections_validates_a_config_built_without_load_config():
    with pytest.raises(ConfigError) as info:
        check_sections(RayE5Config.model_validate({"serve": {"port": 0}, "evaluate": {"num_workers": 0}}))
    assert [e.split(":")[0] for e in info.value.errors] == ["evaluate.num_workers", "serve.port"]
    assert check_sections(RayE5Config()) == RayE5Config()  # no sections: the stages' defaults apply


def test_a_config_with_a_hosted_backend_loads_without_its_key(monkeypatch):
    # The key is the environment's business, checked when generation starts (tests/test_generate.py): a train or
    # serve job on the paper's config needs no OpenAI key.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert load_config(CONFIGS / "e5-mistral-7b.yaml").generate["backend"] == "openai"


def test_validate_command(tmp_path, capsys):
    from ray_e5.cli import main

    assert main(["validate", "--config", str(CONFIGS / "quickstart.yaml")]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    assert main(["validate", "--config", str(CONFIGS / "quickstart.yaml"),
                 "--set", "train.lr=abc", "--set", "serve.prot=1"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["train.lr", "serve.prot"]
    assert main(["validate", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_the_old_evaluate_models_ref_key_still_loads_with_a_notice_naming_the_new_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("evaluate:\n  models:\n    - {label: base, ref: minilm-l6, max_length: 64}\n")
    with pytest.warns(FutureWarning, match=re.escape("evaluate.models[].model")):
        cfg = load_config(path)
    (entry,) = cfg.evaluate.models
    assert entry.model == "minilm-l6" and entry.label == "base" and entry.max_length == 64
    with pytest.raises(ConfigError, match=r"evaluate\.models"):
        load_config(path, ["evaluate.models=[{ref: minilm-l6, model: gemma3-270m}]"])
