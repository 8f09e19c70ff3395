import json
import logging

import numpy as np
import pytest

from cellcurate.errors import InputFormatError
from cellcurate.relabel.backbones import HandcraftedBackbone
from cellcurate.relabel.features import (
    FEATURE_NAMES, cache_dir, check_features, handcrafted_batch_features, handcrafted_image_features,
    hematoxylin_eosin, nucleus_features,
)
from relabel_synth import build_store

F = {n: i for i, n in enumerate(FEATURE_NAMES)}


def disc_image(r=6, size=40, colour=(80, 40, 120), bg=(200, 150, 190)):
    yy, xx = np.mgrid[:size, :size]
    m = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= r * r
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg
    img[m] = colour
    ins = m.astype(np.int32)
    return img, ins, int(m.sum())


def test_disc_exact_values():
    img, ins, area = disc_image()
    f = handcrafted_image_features(img, ins, 1, mpp=0.5)[0]
    assert f[F["area_um2"]] == pytest.approx(area * 0.25)
    assert (f[F["mean_r"]], f[F["mean_g"]], f[F["mean_b"]]) == (80, 40, 120)
    assert f[F["std_r"]] == 0
    assert (f[F["ring_mean_r"]], f[F["ring_mean_g"]], f[F["ring_mean_b"]]) == (200, 150, 190)
    assert f[F["eccentricity"]] < 0.2 and f[F["elongation"]] == pytest.approx(1, abs=0.05)
    assert f[F["circularity"]] == pytest.approx(1.0, abs=0.2)
    assert f[F["major_um"]] == pytest.approx(2 * 6 * 0.5, rel=0.06)  # diameter in µm


def test_sizes_are_in_microns():
    img, ins, _ = disc_image(r=6)
    big = handcrafted_image_features(img, ins, 1, mpp=0.5)[0]
    img2, ins2, _ = disc_image(r=12, size=80)
    fine = handcrafted_image_features(img2, ins2, 1, mpp=0.25)[0]  # same disc, twice the resolution
    assert fine[F["area_um2"]] == pytest.approx(big[F["area_um2"]], rel=0.05)
    assert fine[F["major_um"]] == pytest.approx(big[F["major_um"]], rel=0.05)


def test_hematoxylin_matches_skimage():
    from skimage.color import rgb2hed

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    h, e = hematoxylin_eosin(img)
    ref = rgb2hed(img)
    assert np.allclose(h, ref[..., 0], atol=5e-3) and np.allclose(e, ref[..., 1], atol=2e-2)


def test_batch_equals_single_and_missing_instance_is_nan():
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ins = np.zeros((3, 32, 32), np.int32)
    ins[:, 4:10, 4:12] = 1
    ins[:, 20:28, 18:22] = 2
    ins[1, 20:28, 18:22] = 0  # image 1 says 2 instances but id 2 has no pixels
    batch = handcrafted_batch_features(imgs, ins, [2, 2, 2], mpp=[0.25] * 3)
    for b in range(3):
        single = handcrafted_image_features(imgs[b], ins[b], 2, mpp=0.25)
        assert np.allclose(batch[b], single, equal_nan=True)
    assert np.isnan(batch[1][1]).all() and np.isfinite(batch[0]).all()


def test_check_features_refuses_nan():
    x = np.ones((3, 2), np.float32)
    x[1, 0] = np.nan
    with pytest.raises(InputFormatError, match="1 nuclei have NaN"):
        check_features(x, np.array([5, 6, 7]), where="f.npy")


def test_cache_reused_and_corruption_recomputed(tmp_path, caplog):
    store = build_store(tmp_path / "s", tiles=2, patients=2)
    bb = HandcraftedBackbone()
    f1, ids1 = nucleus_features(store, bb, progress=False)
    folder = cache_dir(store, bb.id)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["n_nuclei"] == len(ids1) == len(store.nuclei(include_ignore=False))
    assert f1.shape == (len(ids1), len(FEATURE_NAMES)) and np.isfinite(f1).all()
    mtime = (folder / "features.npy").stat().st_mtime_ns
    f2, _ = nucleus_features(store, bb, progress=False)  # cached: not rewritten
    assert (folder / "features.npy").stat().st_mtime_ns == mtime and np.array_equal(f1, f2)
    # corrupt one value behind the cache's back
    bad = np.load(folder / "features.npy")
    bad[0, 0] += 1
    np.save(folder / "features.npy", bad)
    with caplog.at_level(logging.WARNING):
        f3, _ = nucleus_features(store, bb, progress=False)
    assert "checksum" in caplog.text
    assert np.array_equal(f1, f3)
