"""The built-in out-of-fold pixel model: its spatial and grouped folds hold out what they say (every
pixel predicted by a fold model that was never trained on that pixel's fold), block folds are dealt
evenly, the config is checked, the CV mode keys the prediction cache, and `curate instances
--pixel-cv` reaches the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cellcurate.datasets.store import Store
from cellcurate.errors import ConfigError


@pytest.fixture()
def store_path(tiny_store_path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(tiny_store_path, dst)
    return dst


def test_block_folds_deal_every_fold_evenly_and_repeat():
    from cellcurate.relabel.instance_predict import block_folds

    f = block_folds((10, 7), block_px=3, k=3, rng=np.random.default_rng(5))
    assert f.shape == (10, 7) and f.dtype == np.int8
    blocks = f[::3, ::3]  # 4 x 3 = 12 blocks, 4 of each fold
    assert sorted(np.bincount(blocks.ravel()).tolist()) == [4, 4, 4]
    for by in range(4):  # each block is one fold, the edge blocks cut by the image border
        for bx in range(3):
            cell = f[by * 3:(by + 1) * 3, bx * 3:(bx + 1) * 3]
            assert (cell == cell.flat[0]).all()
    again = block_folds((10, 7), block_px=3, k=3, rng=np.random.default_rng(5))
    assert np.array_equal(f, again)
    # an image of one block is not always fold 0
    singles = {int(block_folds((4, 4), block_px=8, k=3, rng=np.random.default_rng(s))[0, 0]) for s in range(12)}
    assert singles == {0, 1, 2}


class _Recorder:
    """Stands in for the tree model: fit records the training rows; model j predicts j / 10."""

    def __init__(self) -> None:
        self.fits: list[np.ndarray] = []

    def fit(self, X, y, cfg, what):
        j = len(self.fits)
        self.fits.append(np.asarray(X).copy())

        class Model:
            classes_ = np.array([0, 1])

            def predict_proba(self, F):
                return np.column_stack([1 - np.full(len(F), j / 10), np.full(len(F), j / 10)])

        return Model()


def test_spatial_folds_predict_every_pixel_with_the_model_that_never_saw_its_block(store_path: Path, monkeypatch):
    import cellcurate.relabel.instance_predict as ip

    cfg = ip.PixelModelConfig(cv="spatial", folds=3)
    rec = _Recorder()
    monkeypatch.setattr(ip, "_fit", rec.fit)
    monkeypatch.setattr(ip, "_upscale", lambda p, f, shape: p)  # keep the working grid
    monkeypatch.setattr(ip, "instances_from_prob", lambda prob, **kw: np.zeros(prob.shape, np.int32))
    with Store.open(store_path) as store:
        images = store.images()
        mpp = dict(zip(images["image_id"].astype(str), images["mpp"].astype(float)))
        samples = ip._sample_pixels(store, images, store.nuclei(), mpp, cfg, 3, False)
        out = {i: prob for i, _lab, prob in ip.oof_predictions(store, config=cfg, progress=False)}
        grids = {i: ip._image_grid(img, mpp[i], cfg, i, 3)[2] for i, img, _ in store.iter_images(list(out))}
    assert len(rec.fits) == 3 and set(out) == set(images["image_id"].astype(str))
    feats = np.concatenate([s[0] for s in samples.values()])
    folds = np.concatenate([s[2] for s in samples.values()])
    for j, X in enumerate(rec.fits):  # model j learnt from exactly the sampled pixels outside fold j
        assert np.array_equal(X, feats[folds != j])
    seen = set()
    for image_id, prob in out.items():
        fold_map = grids[image_id]
        assert np.allclose(prob, fold_map / 10)  # each pixel from the model of its own fold
        seen |= set(np.unique(fold_map).tolist())
    assert seen == {0, 1, 2}


def test_grouped_folds_predict_every_image_with_the_model_of_the_other_groups(store_path: Path, monkeypatch):
    import cellcurate.relabel.instance_predict as ip

    cfg = ip.PixelModelConfig(cv="grouped", folds=2)
    rec = _Recorder()
    monkeypatch.setattr(ip, "_fit", rec.fit)
    monkeypatch.setattr(ip, "_upscale", lambda p, f, shape: p)
    monkeypatch.setattr(ip, "instances_from_prob", lambda prob, **kw: np.zeros(prob.shape, np.int32))
    with Store.open(store_path) as store:
        images = store.images().reset_index(drop=True)
        fold, k, _ = ip.image_folds(images, 2, cfg.seed)
        mpp = dict(zip(images["image_id"].astype(str), images["mpp"].astype(float)))
        samples = ip._sample_pixels(store, images, store.nuclei(), mpp, cfg, k, False)
        out = {i: prob for i, _lab, prob in ip.oof_predictions(store, config=cfg, progress=False)}
    ids = images["image_id"].astype(str).to_numpy()
    for j, X in enumerate(rec.fits):
        assert np.array_equal(X, np.concatenate([samples[i][0] for i in ids[fold != j] if i in samples]))
    for i, f in zip(ids, fold):
        assert np.allclose(out[i], f / 10)  # the whole image from the model that did not see its group


def test_spatial_samples_grow_with_the_image_area_and_respect_the_cap():
    import pandas as pd

    from cellcurate.relabel.instance_predict import PixelModelConfig, _sample_counts

    images = pd.DataFrame({"image_id": ["small", "large"], "height": [256, 1000], "width": [256, 1000],
                           "mpp": [0.25, 0.25]})
    n = _sample_counts(images, PixelModelConfig())
    # 64 µm squared = 4,096 µm² -> 2,048 pixels; 250 µm squared -> 31,250
    assert n == {"small": 2048, "large": 31250}
    capped = _sample_counts(images, PixelModelConfig(max_train_pixels=10_000))
    assert sum(capped.values()) <= 10_000 and capped["large"] > capped["small"]
    grouped = _sample_counts(images, PixelModelConfig(cv="grouped"))
    assert grouped == {"small": 2000, "large": 2000}


@pytest.mark.parametrize("kw, msg", [({"cv": "blocks"}, "cv must be 'spatial' or 'grouped'"),
                                     ({"block_um": 0.0}, "block_um and pixels_per_kum2 must be > 0"),
                                     ({"pixels_per_kum2": -1.0}, "block_um and pixels_per_kum2 must be > 0")])
def test_bad_pixel_model_settings_are_refused(kw, msg):
    from cellcurate.relabel.instance_predict import PixelModelConfig

    with pytest.raises(ConfigError, match=msg):
        PixelModelConfig(**kw).validate()


def test_the_cv_mode_keys_the_cache_and_the_cli_passes_it(store_path: Path, monkeypatch):
    import cellcurate.relabel.instance_predict as ip
    from cellcurate.cli.main import cli

    assert ip.PixelModelConfig(cv="spatial").id != ip.PixelModelConfig(cv="grouped").id
    seen: list[str] = []
    real = ip.oof_predictions

    def spy(store, *, config=None, progress=None):
        seen.append(config.cv)
        return real(store, config=config, progress=progress)

    monkeypatch.setattr(ip, "oof_predictions", spy)
    res = CliRunner().invoke(cli, ["instances", str(store_path), "--round", "1", "--pixel-cv", "grouped",
                                   "--no-cleanlab"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert seen == ["grouped"]
    with Store.open(store_path) as store:
        folders = [p.name for p in (store.path / "instances" / "predictions").iterdir()]
    assert folders == [ip.PixelModelConfig(cv="grouped").id]
    bad = CliRunner().invoke(cli, ["instances", str(store_path), "--round", "2", "--pixel-cv", "slides"])
    assert bad.exit_code == 2 and "--pixel-cv" in bad.output
