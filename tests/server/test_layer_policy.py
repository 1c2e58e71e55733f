"""A policy that keeps whole layers local (FedBN + stem / head): those tensors never travel and each site keeps its own."""

import json

import pytest
import torch

from client.site_state import STATE_FILE
from server.rounds import run_federation
from server.run_config import ServerRunConfig
from shared_models import protocol as P
from simulations.domain_shift import DEFAULT_PROFILES
from tests.helpers import TINY_UNET as MODEL, LocalGrid, two_site_data

SITES = [p.name for p in DEFAULT_PROFILES[:2]]

pytestmark = pytest.mark.slow

LAYER_KEYS = {"stem.weight", "stem.bias", "head.weight", "head.bias"}


def test_stem_and_head_stay_at_each_site(tmp_path):
    _, data = two_site_data(tmp_path)
    replies = []
    grid = LocalGrid(SITES, data, tmp_path / "state", on_reply=lambda site, kind, rnd, content: replies.append((kind, content)))
    cfg = ServerRunConfig(model=json.dumps(MODEL), run_name="layers", out_dir=str(tmp_path / "out"), num_rounds=2, batch_size=4,
                          policy="fedbn", policy_overrides=json.dumps({"stem": "local", "head": "local"}),
                          min_nodes=2, wait_seconds=5, round_timeout=60)
    result = run_federation(grid, cfg)
    assert set(result.per_site) == set(SITES)
    travelled = [set(m.content[P.ARRAYS]) for m in grid.sent if P.ARRAYS in m.content]
    travelled += [set(c[P.ARRAYS]) for kind, c in replies if P.ARRAYS in c]
    assert travelled and not any(keys & LAYER_KEYS for keys in travelled)
    kept = [torch.load(tmp_path / "state" / s / "layers" / STATE_FILE, weights_only=False)["tensors"] for s in SITES]
    assert all(LAYER_KEYS <= set(k) for k in kept)
    assert not torch.equal(kept[0]["stem.weight"], kept[1]["stem.weight"])  # each site trained its own input layer
