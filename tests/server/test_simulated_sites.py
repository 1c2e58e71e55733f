"""With ``sites=`` (virtual SuperNodes), too few nodes is an error that says how to get more, not a subset federated."""

import json

import pytest

import server.rounds as rounds
from server.run_config import ServerRunConfig
from server.sites import FederationError

MODEL = json.dumps({"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 3, "channels": [4, 8], "norm": "batch"})


class Nodes:
    def __init__(self, n):
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return self.ids


def test_fewer_virtual_nodes_than_sites_names_the_flower_command(monkeypatch):
    monkeypatch.setattr(rounds, "SIMULATED_NODES_WAIT_S", 0.2)
    cfg = ServerRunConfig(model=MODEL, sites="site-a,site-b,site-c,site-d")
    with pytest.raises(FederationError, match=r"sites= names 4 site\(s\).*only 2 of 4 sites connected.*--num-supernodes 4"):
        rounds.wait_for_sites(Nodes(2), cfg)
    assert rounds.wait_for_sites(Nodes(4), cfg) == [1, 2, 3, 4]


def test_deployed_sites_still_start_with_the_quorum_after_the_wait():
    cfg = ServerRunConfig(model=MODEL, wait_seconds=0.2, min_train_nodes=1, min_nodes=3)
    assert rounds.wait_for_sites(Nodes(2), cfg) == [1, 2]
