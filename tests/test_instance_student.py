"""The K-fold student predictor of the instance round (`curate instances --predictor student`):
every image is predicted by a fold model that never trained on it (nor on its group), extra stores
join every fold's training set, the predictions are cached like the built-in model's, bad options
are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cellcurate.cli.main import cli
from cellcurate.errors import ConfigError
from cellcurate.cli._instance_student import StudentPredictorConfig, student_predictor

FAST = dict(epochs=1, batch_size=4, tile_size=32)


def _small_store(path: Path, *, folds: int = 3, per_fold: int = 2, size: int = 64, seed: int = 0, mpp: float = 0.25):
    """A store of ``folds`` PanNuke-like folds of ``per_fold`` tiles with a few disc nuclei each."""
    from cellcurate.datasets.records import SourceImage
    from cellcurate.datasets.store import Store

    rng = np.random.default_rng(seed)
    store = Store.create(path)
    yy, xx = np.mgrid[:size, :size]
    for fold in range(1, folds + 1):
        with store.unit_writer(f"pannuke-fold{fold}", "pannuke", fingerprint=f"t{seed}-{fold}", origin="/test",
                               stacked=(per_fold, size, size)) as w:
            for t in range(per_fold):
                ins = np.zeros((size, size), np.int32)
                for k in range(1, 5):
                    cy, cx = rng.integers(10, size - 10, 2)
                    ins[((yy - cy) ** 2 + (xx - cx) ** 2 <= 25) & (ins == 0)] = k
                img = np.full((size, size, 3), 210, np.uint8)
                img[ins > 0] = (80, 40, 130)
                present = [k for k in range(1, 5) if (ins == k).any()]
                nuc = pd.DataFrame({"instance_id": np.array(present, np.int32), "kind": "nucleus",
                                    "source_label": "Neoplastic", "origin_channel": 0,
                                    "origin_instance": np.array(present), "origin_region": ""})
                w.add(SourceImage(key=f"fold{fold}/{t:05d}", split=f"fold{fold}", image=img, instances=ins,
                                  nuclei=nuc, origin_file=f"Fold {fold}/images.npy", origin_index=t, mpp=mpp))
            w.commit()
    return store


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Wrap the training entry point: record the image ids of every fold's training set."""
    import cellcurate.models.train as train

    calls: list[tuple[str, list[str]]] = []
    real = train.distill

    def spy(teacher, base, **kw):
        calls.append(("train", [str(base[i]["image_id"]) for i in range(len(base))]))
        return real(teacher, base, **kw)

    monkeypatch.setattr(train, "distill", spy)
    return calls


def test_every_image_is_predicted_by_a_model_that_never_saw_its_group(tmp_path: Path, monkeypatch):
    from cellcurate.relabel.instance_predict import get_predictions
    from cellcurate.cli._instance_student import student_oof_predictions

    calls = _recording(monkeypatch)
    store = _small_store(tmp_path / "s")
    try:
        ids = store.images()["image_id"].astype(str).tolist()
        trained: list[str] = []
        seen: dict[str, list[str]] = {}
        for image_id, lab, prob in student_oof_predictions(store, config=StudentPredictorConfig(**FAST)):
            if len(calls) and calls[-1][0] == "train":
                trained = calls[-1][1]
            seen[image_id] = trained
            assert lab.shape == prob.shape == (64, 64) and lab.dtype == np.int32 and prob.dtype == np.float32
            assert 0.0 <= float(prob.min()) and float(prob.max()) <= 1.0
        assert sorted(seen) == sorted(ids)
        assert len(calls) == 3  # one training per fold
        fold_of = {i: i.split("/")[1] for i in ids}  # pannuke/fold<k>/<tile>
        for image_id, train_ids in seen.items():
            assert image_id not in train_ids
            assert all(fold_of[t] != fold_of[image_id] for t in train_ids)  # nor any image of its group
        # cached like the built-in model's: a second call reads the cache, without training
        cfg = StudentPredictorConfig(**FAST)
        cache, cached = get_predictions(store, custom=student_predictor(store, cfg))
        n_calls = len(calls)
        again, cached2 = get_predictions(store, custom=student_predictor(store, cfg))
        assert (cached, cached2) == (False, True) and len(calls) == n_calls
        assert again.predictor_id.startswith("oof-student-") and again.predictor_id == cache.predictor_id
        assert sorted(again.image_ids()) == sorted(ids)
        other, _ = get_predictions(store, custom=student_predictor(store, StudentPredictorConfig(**{**FAST, "seed": 1})))
        assert other.predictor_id != cache.predictor_id
    finally:
        store.close()


def test_extra_stores_join_every_fold_and_the_store_itself_is_refused(tmp_path: Path, monkeypatch):
    from cellcurate.relabel.instance_predict import get_predictions

    calls = _recording(monkeypatch)
    extra = _small_store(tmp_path / "extra", folds=1, per_fold=2, seed=5)
    extra_ids = extra.images()["image_id"].astype(str).tolist()
    extra.close()
    store = _small_store(tmp_path / "s", folds=2, per_fold=1)
    try:
        cfg = StudentPredictorConfig(**FAST, folds=2, extra_stores=(str(tmp_path / "extra"),))
        cache, _ = get_predictions(store, custom=student_predictor(store, cfg))
        assert len(calls) == 2
        for _, train_ids in calls:
            assert set(extra_ids) <= set(train_ids) and len(train_ids) == 1 + len(extra_ids)
        assert cache.meta["config"]["extra_stores"][0]["fingerprint"]
        with pytest.raises(ConfigError, match="must not be the store itself"):
            student_predictor(store, StudentPredictorConfig(**FAST, extra_stores=(str(tmp_path / "s"),)))
    finally:
        store.close()


@pytest.mark.parametrize("bad, match", [
    ({"folds": 1}, "--folds"), ({"epochs": 0}, "epochs"), ({"tile_size": 100}, "tile_size"),
    ({"preset": "huge"}, "preset"), ({"device": "tpu"}, "device"), ({"threshold": 1.0}, "threshold"),
    ({"threads": 0}, "threads"),
])
def test_bad_student_options_are_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        StudentPredictorConfig(**bad).validate()


def test_cli_student_predictor_runs_a_round_and_refuses_bad_combinations(tmp_path: Path):
    _small_store(tmp_path / "s").close()
    runner = CliRunner()
    r = runner.invoke(cli, ["instances", str(tmp_path / "s"), "--round", "1", "--predictor", "student",
                            "--student-epochs", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "oof-student-" in r.output and "instance round 1 finished" in r.output
    r = runner.invoke(cli, ["instances", str(tmp_path / "s"), "--round", "2", "--extra-training", str(tmp_path / "s")])
    assert r.exit_code != 0 and "--extra-training needs --predictor student" in r.output
    (tmp_path / "p").mkdir()
    r = runner.invoke(cli, ["instances", str(tmp_path / "s"), "--round", "2", "--predictor", "student",
                            "--predictions", str(tmp_path / "p")])
    assert r.exit_code != 0 and "exclude each other" in r.output


def test_a_round_without_flags_writes_an_empty_flags_table(tmp_path: Path):
    """Predictions equal to the annotation: no flag, and flags.parquet still has the contract's schema."""
    import pyarrow.parquet as pq

    from cellcurate.relabel.instance_predict import save_predictions
    from cellcurate.relabel.instances import run_instance_round

    store = _small_store(tmp_path / "s", folds=2, per_fold=1)
    try:
        items = [(i, ins.astype(np.int32), (ins > 0).astype(np.float32)) for i, _img, ins in store.iter_images()]
        cache = save_predictions(store, "exact", {"kind": "test"}, iter(items))
        res = run_instance_round(store, 1, predictions=cache)
    finally:
        store.close()
    assert len(res.flags) == 0 and res.counts == dict.fromkeys(res.counts, 0)
    table = pq.read_table(res.folder / "flags.parquet")
    assert table.num_rows == 0 and str(table.schema.field("nucleus_ids").type) == "list<element: int64>"


def test_predict_image_keeps_the_nuclear_probability_at_the_images_pixels():
    import torch

    from cellcurate.models.predict import predict_image
    from cellcurate.models.student import Student, StudentConfig, student_preset

    torch.manual_seed(0)
    model = Student(**StudentConfig(channels=student_preset("tiny")).to_dict()).eval()
    img = np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    for mpp in (0.25, 0.5):  # the model's pixel size, and one resampled to it and back
        with torch.no_grad():
            p = predict_image(model, img, mpp=mpp, tile=64, overlap=16, device="cpu", with_polygons=False,
                              with_prob=True)
        assert p.nucleus_prob is not None and p.nucleus_prob.shape == (50, 60) == p.instances.shape
        assert p.nucleus_prob.dtype == np.float32 and 0 <= p.nucleus_prob.min() and p.nucleus_prob.max() <= 1
    with torch.no_grad():
        assert predict_image(model, img, mpp=0.25, tile=64, overlap=16, device="cpu").nucleus_prob is None


def test_store_images_resample_once_to_the_models_pixel_size(tmp_path: Path):
    from cellcurate.cli._instance_student import StoreImages

    store = _small_store(tmp_path / "s", folds=1, per_fold=1, mpp=0.5)
    try:
        (image_id,) = store.images()["image_id"].astype(str)
        ins = store.read_instances(image_id)
        (item,) = StoreImages(store, [image_id], mpp=0.25).items
        (same,) = StoreImages(store, [image_id], mpp=0.5).items
    finally:
        store.close()
    assert item["image"].shape == (3, 128, 128) and item["instances"].shape == item["classes"].shape == (128, 128)
    assert item["mpp"] == 0.25 and same["mpp"] == 0.5 and same["instances"].shape == (64, 64)
    assert set(np.unique(item["instances"])) == set(np.unique(ins))  # nearest labels: the same nuclei
    assert set(np.unique(item["classes"])) <= {0, 1} and (item["classes"] == (item["instances"] > 0)).all()
