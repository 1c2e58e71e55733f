"""The round's contract: what the server writes is what the site reads, defaults in one place."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
from flwr.app import ConfigRecord, MetricRecord

from server.run_config import ServerRunConfig
from shared_models.config import ConfigError
from shared_models import protocol as P
from shared_models.protocol import EvalMetrics, ProtocolError, RoundConfig, SiteInfo, TrainMetrics, TrainSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _full() -> RoundConfig:
    return RoundConfig(
        run_name="fed-1", model_spec={"name": "unet", "channels": [4, 8]}, fingerprint="abc", server_round=7, num_rounds=9,
        policy="silobn", policy_overrides={"affine": "local"}, loss="dice",
        train=TrainSettings(epochs=3, lr=0.5, batch_size=2, seed=11, device="cuda:1", amp=False, channels_last=False,
                            proximal_mu=0.01, weight_decay=1e-4, optimizer="sgd", momentum=0.9, schedule="cosine",
                            warmup_fraction=0.1, persist_optimizer=False, augment=False, patch_size="32,32,16",
                            target_spacing="1.5,1.5,3", loader_workers=2),
        intensity="none", test_fraction=0.4, split_seed=5, sim_sites=("a", "b"), sim_data_dir="/d", sim_state_dir="/s",
        with_hd95=False, eval_statistics="stored", with_fingerprint=True, finetune_epochs=3, personal_mu=0.5, transport_dtype="bf16",
    )


def test_round_config_round_trips_through_a_flower_config_record() -> None:
    cfg = _full()
    assert RoundConfig.from_record(ConfigRecord(cfg.to_record())) == cfg
    # every field differs from its default, so a key that is written but not read would fail above
    default = RoundConfig(run_name="", model_spec={}, fingerprint="")
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}
    assert changed == {f.name for f in dataclasses.fields(cfg)}
    assert {f.name for f in dataclasses.fields(TrainSettings) if getattr(cfg.train, f.name) == getattr(TrainSettings(), f.name)} == set()


def test_missing_keys_take_the_one_set_of_defaults() -> None:
    minimal = {P.RUN_NAME: "r", P.MODEL: "{}", P.FINGERPRINT: "f"}
    assert RoundConfig.from_record(minimal) == RoundConfig(run_name="r", model_spec={}, fingerprint="f")
    server = ServerRunConfig(model="{}")
    assert server.round_config("f").train == TrainSettings()  # the server's defaults are the contract's


def test_server_run_config_builds_the_round_config() -> None:
    cfg = ServerRunConfig(model='{"name": "unet"}', lr=0.1, local_epochs=2, sites="x,y", policy_overrides='{"mixing": "shared"}')
    rc = cfg.round_config("fp")
    assert (rc.train.lr, rc.train.epochs, rc.sim_sites, rc.policy_overrides) == (0.1, 2, ("x", "y"), {"mixing": "shared"})
    assert RoundConfig.from_record(rc.to_record()) == rc


def test_server_run_config_carries_the_local_recipe_and_the_federation_length() -> None:
    cfg = ServerRunConfig(model="{}", num_rounds=12, optimizer="sgd", momentum=0.9, lr_schedule="cosine", warmup_fraction=0.05,
                          persist_optimizer=False, augment=False)
    rc = RoundConfig.from_record(ConfigRecord(cfg.round_config("fp").to_record()))
    assert rc.num_rounds == 12
    assert (rc.train.optimizer, rc.train.momentum, rc.train.schedule, rc.train.warmup_fraction) == ("sgd", 0.9, "cosine", 0.05)
    assert (rc.train.persist_optimizer, rc.train.augment) == (False, False)
    assert ServerRunConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize("changes,key", [({"optimizer": "lion"}, "optimizer"), ({"lr_schedule": "step"}, "lr-schedule"),
                                         ({"warmup_fraction": 1.0}, "warmup-fraction"), ({"momentum": -0.1}, "momentum")])
def test_server_run_config_refuses_unknown_recipe_values_naming_the_key(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        ServerRunConfig(model="{}", **changes)


@pytest.mark.parametrize(
    "record,match",
    [
        ({P.RUN_NAME: "r", P.FINGERPRINT: "f"}, "missing key 'model'"),
        ({P.RUN_NAME: "r", P.MODEL: "{", P.FINGERPRINT: "f"}, "'model' is not valid JSON"),
        ({P.RUN_NAME: "r", P.MODEL: "[]", P.FINGERPRINT: "f"}, "expected a JSON object"),
        ({P.RUN_NAME: "r", P.MODEL: "{}", P.FINGERPRINT: "f", P.LR: "fast"}, "'lr': expected float"),
        ({P.RUN_NAME: "r", P.MODEL: "{}", P.FINGERPRINT: "f", P.BATCH_SIZE: True}, "'batch-size': expected int"),
        ({P.MODEL: "{}", P.FINGERPRINT: "f"}, "missing key 'run-name'"),
    ],
)
def test_malformed_records_name_the_key(record: dict, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        RoundConfig.from_record(record)


def test_replies_round_trip() -> None:
    info = SiteInfo("site-a", 12, 4)
    assert SiteInfo.from_record(ConfigRecord(info.to_record())) == info
    train = TrainMetrics(12, 0.25, 3.5, 4.0)
    assert TrainMetrics.from_record(MetricRecord(train.to_record())) == train
    ev = EvalMetrics(4, 0.8, (0.7, 0.9), 2.5, (2.0, 3.0), 1.25, ((0.6, 0.8), (0.8, 1.0)))
    assert EvalMetrics.from_record(MetricRecord(ev.to_record())) == ev
    assert ev.to_json() == {"dice": 0.8, "n_test": 4, "dice_per_class": [0.7, 0.9], "hd95": 2.5, "hd95_per_class": [2.0, 3.0],
                            "dice_per_case": [[0.6, 0.8], [0.8, 1.0]]}
    absent = EvalMetrics(1, 0.5, (0.5, float("nan")), dice_per_case=((0.5, float("nan")),))
    assert absent.to_json()["dice_per_case"] == [[0.5, None]]  # JSON has no NaN


def test_per_case_scores_that_do_not_fill_whole_rows_are_refused() -> None:
    record = EvalMetrics(2, 0.8, (0.7, 0.9), dice_per_case=((0.6, 0.8), (0.8, 1.0))).to_record()
    record[P.DICE_PER_CASE] = record[P.DICE_PER_CASE][:3]
    with pytest.raises(P.ProtocolError, match="dice-per-case"):
        EvalMetrics.from_record(MetricRecord(record))


# The modules that build or read Flower messages (configuration files have their own schema).
MESSAGE_MODULES = ("server/rounds.py", "server/sites.py", "server/validation.py", "server/strategy.py", "server/app.py",
                   "client/app.py", "client/site_paths.py", "client/exchange.py")


def test_no_message_key_is_a_literal_outside_the_contract() -> None:
    """Server and site code name message keys through ``protocol`` only."""
    keys = {v for k, v in vars(P).items() if k.isupper() and isinstance(v, str) and "-" in v}
    offenders = []
    for module in MESSAGE_MODULES:
        for path in [ROOT / module]:
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                for key in keys:
                    if re.search(rf"""["']{re.escape(key)}["']""", line) and "add_argument" not in line and "--" + key not in line:
                        offenders.append(f"{path.name}:{lineno}: {key}")
    assert not offenders, offenders


def test_patch_sizes_parse_and_a_malformed_one_names_its_key() -> None:
    settings = TrainSettings(patch_size="32,32,16", target_spacing="1.5,1.5,3")
    assert settings.patch_shape == (32, 32, 16) and settings.target_spacing_mm == (1.5, 1.5, 3.0)
    assert TrainSettings().patch_shape == () and TrainSettings().target_spacing_mm == ()
    for bad in ("32,x,16", "0,32,32", "32"):
        with pytest.raises(P.ProtocolError, match="patch-size"):
            TrainSettings(patch_size=bad).patch_shape


def test_a_malformed_patch_size_in_a_config_is_refused_naming_its_key() -> None:
    from server.server_config import FederationSection
    from shared_models.config import ConfigError
    from simulations.experiment import ExperimentConfig

    with pytest.raises(ConfigError, match="^patch-size"):
        ExperimentConfig(methods=("fedbn",), patch_size=(0, 32, 32))
    with pytest.raises(ConfigError, match="^target-spacing"):
        ExperimentConfig(methods=("fedbn",), target_spacing=(1.0,))
    with pytest.raises(ConfigError, match="federation.patch-size"):
        FederationSection(model={}, patch_size=(32,))
    with pytest.raises(ConfigError, match="^patch-size: expected numbers"):  # built in code, not through the typed loader
        ExperimentConfig(methods=("fedbn",), patch_size=("a", 32))
    assert ExperimentConfig(methods=("fedbn",), patch_size=(), target_spacing=(1.5, 1.5, 3.0)).patch_size == ()
