"""A federation stopped after round 2 and resumed ends where an uninterrupted one ends.

The stop is the hardest one for the sites: the server dies after its round-2
checkpoint while the sites have already trained round 3 (their round-3 local
tensors and optimizer state are on disk). The repeated round 3 must start from
what the sites had before it. The federation's length stays the same: the
sites' learning-rate schedule spans it.
"""


import pytest
import torch

from server.checkpoint import CheckpointStore
from simulations.domain_shift import DEFAULT_PROFILES, generate_dataset
from simulations.engine import run_simulated_federation
from simulations.experiment import Arm, Cell, ExperimentConfig
from simulations.run import run_config_for

pytestmark = pytest.mark.slow

SPEC = {"name": "unet", "channels": [4, 8], "norm": "batch", "spatial-dims": 2, "in-channels": 1, "out-channels": 3}


def _fingerprint():
    from shared_models import architecture_fingerprint, build_model

    return architecture_fingerprint(build_model(SPEC))


def test_resumed_run_matches_the_uninterrupted_run(tmp_path):
    profiles = DEFAULT_PROFILES[:2]
    root = generate_dataset(tmp_path / "data", profiles=profiles, cases_per_site=8, size=(32, 32), num_classes=3)
    sites = [p.name for p in profiles]
    cfg = ExperimentConfig(rounds=3, lr=3e-3, batch_size=4, device="cpu", methods=("fedbn",), seeds=(0,))
    cell = Cell("data", "fedbn", Arm("fedbn"), SPEC, 0)

    straight = tmp_path / "straight"
    config = run_config_for(cfg, cfg.data, cell, root, sites, straight)
    run_simulated_federation(config, len(sites))

    resumed = tmp_path / "resumed"
    config_resumed = {**run_config_for(cfg, cfg.data, cell, root, sites, resumed), "resume": True}
    run_simulated_federation(config_resumed, len(sites))
    (resumed / "checkpoints" / "round-0003.pt").unlink()  # "crash" after the sites trained round 3, before its checkpoint
    assert (resumed / "site-state" / sites[0] / config["run-name"] / "optimizer_state.previous.pt").exists()
    fed = run_simulated_federation(config_resumed, len(sites))  # restart: rounds 3..3
    assert fed["resumed_from"] == 3
    assert [e["round"] for e in fed["history"]] == [1, 2, 3]

    fp = _fingerprint()
    a = CheckpointStore(straight / "checkpoints").latest(run_name=config["run-name"], fingerprint=fp, policy="fedbn")
    b = CheckpointStore(resumed / "checkpoints").latest(run_name=config["run-name"], fingerprint=fp, policy="fedbn")
    assert a.round == b.round == 3
    for key, value in a.arrays.items():
        assert torch.equal(value, b.arrays[key]), key  # bit-identical: replies are aggregated in site order
