"""The last global shared tensors a site keeps for `fedsite predict`."""

import pytest
import torch

from client.global_store import GlobalSnapshot, GlobalStoreError, global_path, load_global, save_global


def _snap(round_, value=1.0):
    return GlobalSnapshot("run", round_, {"name": "unet"}, "fedbn", {}, "fp", {"w": torch.full((2,), value)}, "zscore")


def test_round_trip_and_no_regression_to_an_older_round(tmp_path):
    save_global(tmp_path, _snap(3, 3.0))
    save_global(tmp_path, _snap(2, 2.0))  # an older round never overwrites a newer one
    snap = load_global(tmp_path, "run")
    assert snap.round == 3 and torch.equal(snap.tensors["w"], torch.full((2,), 3.0))
    assert snap.model_spec == {"name": "unet"} and snap.policy == "fedbn" and snap.intensity == "zscore"


def test_missing_foreign_or_corrupt_files_are_refused_by_name(tmp_path):
    with pytest.raises(GlobalStoreError, match="no global model stored"):
        load_global(tmp_path, "run")
    save_global(tmp_path, _snap(1))
    blob = torch.load(global_path(tmp_path, "run"), weights_only=True)
    blob["tensors"]["w"] += 1
    torch.save(blob, global_path(tmp_path, "run"))
    with pytest.raises(GlobalStoreError, match="checksum mismatch"):
        load_global(tmp_path, "run")
