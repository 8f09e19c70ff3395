import json
import logging

import numpy as np
import pytest
from relabel_features_reference import reference_batch_features
from relabel_synth import build_store

from cellcurate.errors import InputFormatError
from cellcurate.relabel import features as features_mod
from cellcurate.relabel.backbones import HandcraftedBackbone
from cellcurate.relabel.features import (
    FEATURE_NAMES,
    cache_dir,
    check_features,
    handcrafted_batch_features,
    handcrafted_image_features,
    hematoxylin_eosin,
    nucleus_features,
)

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


def blob_tiles(n_tiles, size, n_nuclei, *, seed, r_max=14):
    """Random overlapping ellipses (later ones cover earlier ones, so some ids vanish or split),
    touching each other and the tile border, on a noisy H&E-like background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.clip(rng.normal((215, 170, 205), 12, (n_tiles, size, size, 3)), 0, 255).astype(np.uint8)
    ins = np.zeros((n_tiles, size, size), np.int32)
    for t in range(n_tiles):
        for k in range(1, n_nuclei + 1):
            cy, cx = rng.uniform(-4, size + 4, 2)
            ry, rx = rng.uniform(1, r_max, 2)
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            ins[t][m] = k
            imgs[t][m] = np.clip(rng.normal(rng.uniform(40, 160, 3), 10, (int(m.sum()), 3)), 0, 255)
    return imgs, ins


def test_exact_rectangle():
    img = np.full((12, 12, 3), 200, np.uint8)
    ins = np.zeros((12, 12), np.int32)
    ins[4:6, 3:6] = 1  # 2 × 3 pixels, every one on the boundary
    img[ins == 1] = (60, 30, 90)
    f = handcrafted_image_features(img, ins, 1, mpp=0.5)[0]
    assert f[F["area_um2"]] == pytest.approx(6 * 0.25)
    assert f[F["perimeter_um"]] == pytest.approx(6 * 1.12 * 0.5)
    assert f[F["extent"]] == 1.0
    assert f[F["dark_fraction"]] == 0.0 and f[F["std_h"]] == 0.0
    assert f[F["grad_mean"]] > 0 and f[F["ring_mean_g"]] == 200
    # axes from the second moments (+1/12 per pixel): var_x = 2/3 + 1/12, var_y = 1/4 + 1/12
    assert f[F["major_um"]] == pytest.approx(4 * np.sqrt(2 / 3 + 1 / 12) * 0.5, rel=1e-5)
    assert f[F["minor_um"]] == pytest.approx(4 * np.sqrt(1 / 4 + 1 / 12) * 0.5, rel=1e-5)


@pytest.mark.parametrize("size, n_tiles, n_nuclei, mpp", [(64, 5, 12, 0.25), (96, 2, 40, 0.5), (130, 1, 60, 0.24)])
def test_matches_reference_implementation(size, n_tiles, n_nuclei, mpp):
    imgs, ins = blob_tiles(n_tiles, size, n_nuclei, seed=size)
    ns = [n_nuclei + 1] * n_tiles  # id n+1 and ids painted over have no pixels: NaN rows in both
    new = np.concatenate(handcrafted_batch_features(imgs, ins, ns, mpp=[mpp] * n_tiles))
    ref = np.concatenate(reference_batch_features(imgs, ins, ns, mpp=[mpp] * n_tiles))
    assert np.array_equal(np.isnan(new), np.isnan(ref)) and np.isnan(new).any()
    ok = np.isfinite(ref)
    # float32 colour look-up tables against float64 ones: relative agreement ~1e-6
    assert np.allclose(new[ok], ref[ok], rtol=2e-5, atol=1e-5)


def test_chunks_do_not_change_values(monkeypatch):
    imgs, ins = blob_tiles(7, 48, 15, seed=3)
    ns = ins.reshape(7, -1).max(axis=1)
    whole = handcrafted_batch_features(imgs, ins, ns, mpp=[0.25] * 7)
    monkeypatch.setattr(features_mod, "CHUNK_PIXELS", 48 * 48 * 2)  # chunks of 2, 2, 2, 1 tiles
    chunked = handcrafted_batch_features(imgs, ins, ns, mpp=[0.25] * 7)
    for a, b in zip(whole, chunked):
        assert np.array_equal(a, b, equal_nan=True)


def test_max_filter_matches_scipy():
    from scipy import ndimage

    lab = np.zeros((2, 7, 9), np.uint8)
    lab[0, 3, 4] = 5
    out = features_mod._max_filter_square(lab, 1)
    expected = np.zeros_like(lab)
    expected[0, 2:5, 3:6] = 5
    assert np.array_equal(out, expected)
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 300, (3, 40, 33)).astype(np.uint16) * (rng.random((3, 40, 33)) < 0.05)
    for r in (1, 2, 5, 8, 20):
        ref = ndimage.maximum_filter(lab, size=(1, 2 * r + 1, 2 * r + 1), mode="constant", cval=0)
        assert np.array_equal(features_mod._max_filter_square(lab, r), ref)


def test_hematoxylin_eosin_tables_agree():
    rng = np.random.default_rng(2)
    px = rng.integers(0, 256, (5000, 3), dtype=np.uint8)
    h, e = features_mod._hematoxylin_eosin_pixels(px[:, 0].copy(), px[:, 1].copy(), px[:, 2].copy())
    h64, e64 = hematoxylin_eosin(px[None])
    assert np.allclose(h, h64[0], atol=1e-6) and np.allclose(e, e64[0], atol=1e-6)


BAD_INPUTS = [  # (images, instances, ns, mpp, message)
    (np.zeros((1, 8, 8, 3), np.uint8), np.full((1, 8, 8), 3, np.int32), [2], [0.25], "ids outside 0..2"),
    (np.zeros((1, 8, 8, 3), np.uint8), np.full((1, 8, 8), -1, np.int32), [2], [0.25], "ids outside"),
    (np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8), np.int32), [0], [0.25], "uint8 images"),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.int32), [0], [0.25, 0.25], "2 images but 1"),
    (np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 9), np.int32), [0], [0.25], "do not match"),
]


@pytest.mark.parametrize("images, instances, ns, mpp, message", BAD_INPUTS)
def test_bad_inputs(images, instances, ns, mpp, message):
    with pytest.raises(InputFormatError, match=message):
        handcrafted_batch_features(images, instances, ns, mpp=mpp)


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
