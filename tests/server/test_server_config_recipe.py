"""server.yaml's federation section carries the sites' local recipe into the ServerApp's run config."""

import pytest
import yaml

from server.provision import provision
from server.run_config import ServerRunConfig
from server.server_config import ServerConfig, run_config
from shared_models.config import ConfigError, load_config


def _with_federation(tmp_path, **changes) -> ServerRunConfig:
    provision(tmp_path, "127.0.0.1", ["site-a"])
    path = tmp_path / "server.yaml"
    doc = yaml.safe_load(path.read_text())
    assert {"optimizer", "lr-schedule", "warmup-fraction", "persist-optimizer", "augment"} <= set(doc["federation"])
    doc["federation"].update(changes)
    path.write_text(yaml.safe_dump(doc))
    return ServerRunConfig.from_run_config(run_config(load_config(ServerConfig, path), tmp_path / "out"))


def test_the_recipe_keys_of_server_yaml_reach_the_run_config(tmp_path):
    run = _with_federation(tmp_path, **{"optimizer": "adamw", "lr-schedule": "cosine", "warmup-fraction": 0.05,
                                        "persist-optimizer": False, "augment": False, "momentum": 0.9})
    assert (run.optimizer, run.lr_schedule, run.warmup_fraction, run.persist_optimizer, run.augment, run.momentum) == (
        "adamw", "cosine", 0.05, False, False, 0.9)
    assert run.round_config("fp").num_rounds == run.num_rounds == 20


def test_an_unknown_optimizer_in_server_yaml_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="optimizer: expected one of"):
        _with_federation(tmp_path, optimizer="lion")
