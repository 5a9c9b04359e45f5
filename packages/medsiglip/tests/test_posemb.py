"""Position-embedding resampling against torch's bilinear interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsiglip import resize_position_embedding


@pytest.mark.parametrize(("old", "new"), [(8, 4), (4, 8), (6, 9), (5, 5)])
def test_matches_torch_bilinear_antialias(old, new):
    table = np.random.default_rng(0).normal(size=(old * old, 12)).astype(np.float32)
    grid = torch.from_numpy(table.reshape(1, old, old, 12)).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(new, new), mode="bilinear",
                                           align_corners=False, antialias=True)
    want = want.permute(0, 2, 3, 1).reshape(new * new, 12).numpy()
    np.testing.assert_allclose(resize_position_embedding(table, new), want, atol=1e-5)


def test_without_antialias_matches_plain_bilinear():
    table = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    grid = torch.from_numpy(table.reshape(1, 8, 8, 4)).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bilinear",
                                           align_corners=False, antialias=False)
    want = want.permute(0, 2, 3, 1).reshape(16, 4).numpy()
    got = resize_position_embedding(table, 4, antialias=False)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_not_square_is_an_error():
    with pytest.raises(ValueError, match="not a square grid"):
        resize_position_embedding(np.zeros((10, 4), np.float32), 4)
