"""Typed config loading: errors name the key path and the file."""

import pytest

from shared_models.build import build_model, model_config
from shared_models.config import ConfigError, load_config
from simulations.experiment import ExperimentConfig


def test_unknown_nested_key_names_its_path(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  synthetic:\n    cases-per-sit: 3\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: data.synthetic.cases-per-sit: unknown key"):
        load_config(ExperimentConfig, path)


def test_wrong_type_and_bad_method_are_named(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("rounds: ten\n")
    with pytest.raises(ConfigError, match="rounds: expected an integer"):
        load_config(ExperimentConfig, path)
    path.write_text("methods: [fedbn, fedbm]\n")
    with pytest.raises(ConfigError, match="unknown method"):
        load_config(ExperimentConfig, path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(ExperimentConfig, path)


def test_model_spec_errors_name_model_keys():
    with pytest.raises(ConfigError, match="model.name: unknown model 'unett'"):
        model_config({"name": "unett"})
    with pytest.raises(ConfigError, match="model.chanels: unknown key"):
        build_model({"name": "unet", "chanels": [8, 16]})
    with pytest.raises(ConfigError, match="model.channels"):
        build_model({"name": "unet", "channels": 16})


def test_same_seed_same_initial_weights():
    a = build_model({"name": "unet", "channels": [8, 16]}, seed=3).state_dict()
    b = build_model({"name": "unet", "channels": [8, 16]}, seed=3).state_dict()
    assert all((a[k] == b[k]).all() for k in a)
