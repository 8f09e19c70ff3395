"""HoVer targets: exact small cases, ignore/unknown handling, dihedral equivariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellcurate.errors import ConfigError
from cellcurate.models.targets import (
    IGNORE,
    dihedral,
    dihedral_hv,
    hover_targets,
    inverse_dihedral,
    inverse_dihedral_hv,
)


def test_single_square_exact_values():
    inst = np.zeros((8, 9), np.int32)
    inst[2:7, 3:8] = 4  # 5x5 square, centroid (row 4, col 5), id not 1
    cls = np.where(inst > 0, 3, 0).astype(np.uint8)
    t = hover_targets(inst, cls)
    h, v = t["hv"]
    assert h[4, 3:8].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert v[2:7, 5].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert h[2, 3] == -1.0 and v[2, 3] == -1.0 and h[6, 7] == 1.0
    assert np.all(t["hv"][:, inst == 0] == 0)
    assert t["np"].sum() == 25 and t["np"].dtype == np.uint8
    assert set(np.unique(t["tp"])) == {0, 3}
    assert t["valid"].all()


def test_even_square_uses_exact_centroid():
    inst = np.zeros((6, 6), np.int32)
    inst[1:5, 1:5] = 1  # centroid 2.5: distances -1.5, -0.5, 0.5, 1.5
    t = hover_targets(inst, (inst > 0).astype(np.uint8))
    np.testing.assert_allclose(t["hv"][0, 2, 1:5], [-1.0, -1 / 3, 1 / 3, 1.0], rtol=1e-6)


def test_per_instance_normalisation_is_independent():
    inst = np.zeros((10, 20), np.int32)
    inst[1:4, 1:4] = 1  # 3 wide
    inst[1:8, 8:19] = 2  # 11 wide
    t = hover_targets(inst, (inst > 0).astype(np.uint8) * 2)
    assert t["hv"][0, 2, 1] == -1.0 and t["hv"][0, 2, 3] == 1.0
    assert t["hv"][0, 2, 8] == -1.0 and t["hv"][0, 2, 18] == 1.0
    assert t["hv"][0, 2, 13] == 0.0 and t["hv"][0, 2, 14] == pytest.approx(0.2)


def test_ignore_and_unknown_pixels():
    inst = np.zeros((6, 6), np.int32)
    inst[0:2, 0:2] = 1
    inst[3:5, 3:5] = 2
    cls = np.zeros((6, 6), np.uint8)
    cls[0:2, 0:2] = IGNORE  # an ambiguous region drawn as an instance
    cls[3:5, 3:5] = 0  # a nucleus with no class: type unknown
    cls[5, 0] = 2  # a class pixel outside every instance
    t = hover_targets(inst, cls)
    assert not t["valid"][0:2, 0:2].any() and t["valid"].sum() == 32
    assert (t["np"][0:2, 0:2] == IGNORE).all() and (t["hv"][:, 0:2, 0:2] == 0).all()
    assert (t["np"][3:5, 3:5] == 1).all() and (t["tp"][3:5, 3:5] == IGNORE).all()
    assert t["tp"][5, 0] == IGNORE and t["np"][5, 0] == 0


def test_empty_and_bad_shapes():
    t = hover_targets(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.uint8))
    assert t["np"].sum() == 0 and not t["hv"].any()
    with pytest.raises(ConfigError, match="one shape"):
        hover_targets(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.uint8))


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_targets_commute_with_the_dihedral_group(k, flip):
    rng = np.random.default_rng(k)
    inst = np.zeros((12, 12), np.int32)
    inst[1:6, 2:10] = 1
    inst[7:11, 0:4] = 2
    inst[8:11, 6:9] = 3
    inst[rng.integers(0, 12), rng.integers(0, 12)] = 4
    cls = np.where(inst > 0, 1 + inst % 3, 0).astype(np.uint8)
    before = torch.from_numpy(hover_targets(inst, cls)["hv"])
    moved = hover_targets(dihedral(torch.from_numpy(inst), k, flip).numpy(), dihedral(torch.from_numpy(cls), k, flip).numpy())
    torch.testing.assert_close(dihedral_hv(before, k, flip), torch.from_numpy(moved["hv"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(inverse_dihedral_hv(dihedral_hv(before, k, flip), k, flip), before)
    x = torch.arange(12 * 12.0).reshape(12, 12)
    assert torch.equal(inverse_dihedral(dihedral(x, k, flip), k, flip), x)
