import pytest
import yaml

from sylva_ray.base.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    config_field_docs,
)
from sylva_ray.engine.resolve import build_config, load_config


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg.data.name == "digits"
    assert cfg.attack.eps == pytest.approx(0.05)  # README's defaults table: 0.05 for 8x8 digits
    assert cfg.lora.target_modules == ["attn.qkv"]
    assert cfg.federation.aggregation == "balltree"


def test_smoke_preset_differs_only_where_it_says(smoke_config):
    defaults = ExperimentConfig()
    assert smoke_config.federation.rounds == PRESETS["smoke"]["federation"]["rounds"]
    assert smoke_config.lora == defaults.lora


def test_yaml_then_set_precedence(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"federation": {"rounds": 7}, "lora": {"rank": 4}}))
    cfg = load_config("smoke", path, ["lora.rank=16", "runtime.client_resources={num_cpus: 2}"])
    assert cfg.federation.rounds == 7  # file beats preset
    assert cfg.lora.rank == 16  # --set beats file
    assert cfg.runtime.client_resources == {"num_cpus": 2.0}
    assert cfg.data.num_clients == PRESETS["smoke"]["data"]["num_clients"]  # preset kept elsewhere


def test_yaml_round_trip_is_identity():
    cfg = load_config("smoke", overrides=["lora.target_modules=[attn.qkv, mlp.fc1]"])
    again = build_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    "override, named",
    [
        ("data.alpha=0", "data.alpha"),
        ("data.alpha=-1", "data.alpha"),
        ("data.nmae=digits", "data.nmae"),
        ("lora.rank=abc", "lora.rank"),
        ("data.partition=zipf", "data.partition"),
        ("federation.aggregation=mean", "federation.aggregation"),
        ("attack.eval_attack=cw", "attack.eval_attack"),
        ("lora.target_modules=[proj]", "lora.target_modules"),
        ("model.pretrained=checkpoint", "model.checkpoint"),
        ("loss.class_weighting=sqrt", "loss.class_weighting"),
        ("runtime.client_resources={gpus: 1}", "runtime.client_resources.gpus"),
    ],
)
def test_bad_values_name_the_field(override, named):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides=[override])
    assert named in str(info.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides=["data.alpha=-1", "lora.rank=0"])
    assert "data.alpha" in str(info.value) and "lora.rank" in str(info.value)


def test_set_without_equals_is_explained():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("smoke", overrides=["lora.rank"])


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="no such file"):
        load_config("smoke", "/nonexistent/exp.yaml")


def test_paper_preset_needs_the_local_cifar_folder(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        load_config("paper", overrides=[f"data.root={tmp_path / 'missing'}"])
    cfg = load_config("paper", overrides=[f"data.root={tmp_path}"])
    assert cfg.model.name == "vit_base_patch16_224" and cfg.attack.eps == pytest.approx(8 / 255)


def test_every_field_is_documented():
    rows = config_field_docs()
    assert len(rows) > 50
    undocumented = [name for name, _, _, doc in rows if "." in name and not doc]
    assert undocumented == []
