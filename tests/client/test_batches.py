"""Local-training batches: every sample exactly once per epoch, never a batch of one."""

import pytest
import torch

from client.trainer import _batches


@pytest.mark.parametrize("n", [1, 2, 8, 9, 16, 17, 25, 30])
def test_batches_cover_every_sample_once_and_merge_a_trailing_single(n):
    chunks = _batches(n, 8, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(chunks).tolist()) == list(range(n))
    assert n == 1 or all(len(c) > 1 for c in chunks)
