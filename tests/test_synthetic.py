"""Tests of the synthetic PanNuke + MoNuSAC sample: exact format facts, truth consistency,
determinism, atomicity and a separability sanity check."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import defusedxml.ElementTree as DET
import numpy as np
import pandas as pd
import pytest
import tifffile

from cellcurate.datasets import synthetic as syn
from cellcurate.datasets.taxonomy import Taxonomy
from cellcurate.errors import ConfigError, StateError

FLIP = 0.2


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> syn.SampleInfo:
    return syn.write_sample(tmp_path_factory.mktemp("syn") / "tiny", preset="tiny", seed=0, flip_fraction=FLIP)


@pytest.fixture(scope="module")
def truth(sample: syn.SampleInfo) -> pd.DataFrame:
    return pd.read_parquet(sample.truth_path)


def _fold(sample: syn.SampleInfo, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = sample.pannuke_root / f"Fold {k}"
    return (
        np.load(base / "images" / f"fold{k}" / "images.npy", mmap_mode="r"),
        np.load(base / "images" / f"fold{k}" / "types.npy"),
        np.load(base / "masks" / f"fold{k}" / "masks.npy", mmap_mode="r"),
    )


def _xml_files(sample: syn.SampleInfo) -> list[Path]:
    return sorted(sample.monusac_root.glob("*/*/*.xml"))


def _regions(path: Path) -> list[tuple[str, str, Any, np.ndarray]]:
    """(class, Region Id, Region element, (V, 2) vertices) of every region, in document order."""
    root = DET.parse(path).getroot()
    out = []
    for ann in root.findall("Annotation"):
        label = ann.find("Attributes/Attribute").get("Name")
        for reg in ann.findall("Regions/Region"):
            v = np.array([[float(x.get("X")), float(x.get("Y"))] for x in reg.findall("Vertices/Vertex")])
            out.append((label, reg.get("Id"), reg, v))
    return out


# ---------------------------------------------------------------------------------------------
# constants agree with the taxonomy and the real fixtures
# ---------------------------------------------------------------------------------------------
def test_constants_match_taxonomy() -> None:
    tax = Taxonomy.default()
    assert syn.CLASS_NAMES == tax.names
    assert set(syn.PANNUKE_LABELS) == set(tax.source_labels("pannuke"))
    assert set(syn.MONUSAC_LABELS) | {"Ambiguous"} == set(tax.source_labels("monusac"))


def test_tissue_names_are_the_real_ones(fixtures_dir: Path) -> None:
    real = np.load(fixtures_dir / "pannuke" / "fold1_types.npy")
    assert real.dtype == np.dtype("<U13")
    assert sorted(set(real.tolist())) == sorted(syn.PANNUKE_TISSUES)


# ---------------------------------------------------------------------------------------------
# PanNuke format
# ---------------------------------------------------------------------------------------------
def test_pannuke_layout_shapes_dtypes(sample: syn.SampleInfo) -> None:
    for k in (1, 2, 3):
        images, types, masks = _fold(sample, k)
        assert images.shape == (6, 256, 256, 3) and images.dtype == np.float64
        assert masks.shape == (6, 256, 256, 6) and masks.dtype == np.float64
        assert types.shape == (6,) and types.dtype == np.dtype("<U13")
        assert set(types.tolist()) <= set(syn.PANNUKE_TISSUES)
        img = np.asarray(images)
        assert img.min() >= 0 and img.max() <= 255 and np.array_equal(img, np.rint(img))
        m = np.asarray(masks)
        assert np.array_equal(m, np.rint(m)) and m.min() == 0
        # channel 5 is 1.0 exactly where no channel 0-4 holds a nucleus
        np.testing.assert_array_equal(m[..., 5], (m[..., :5].max(axis=-1) == 0).astype(np.float64))


def test_pannuke_ids_collide_are_sparse_and_empty_tiles_exist(sample: syn.SampleInfo) -> None:
    collide = sparse = empty = overlap = 0
    for k in (1, 2, 3):
        _, _, masks = _fold(sample, k)
        for i in range(masks.shape[0]):
            m = np.asarray(masks[i])
            if not m[..., :5].any():
                empty += 1
                continue
            per_channel = [set(np.unique(m[..., c]).tolist()) - {0.0} for c in range(5)]
            for c in range(5):
                ids = sorted(per_channel[c])
                if ids and ids != list(range(1, len(ids) + 1)):
                    sparse += 1
                for d in range(c + 1, 5):
                    collide += bool(per_channel[c] & per_channel[d])
            overlap += int(((m[..., :5] > 0).sum(axis=-1) > 1).sum())
    assert empty >= 3  # one per fold with the tiny preset
    assert collide > 0, "expected raw ids shared by two channels of one tile"
    assert sparse > 0, "expected non-contiguous raw ids"
    assert overlap > 0, "expected a few pixels claimed by two channels"


def test_pannuke_truth_matches_masks_exactly(sample: syn.SampleInfo, truth: pd.DataFrame) -> None:
    pk = truth[truth["source"] == "pannuke"]
    found = set()
    for k in (1, 2, 3):
        _, _, masks = _fold(sample, k)
        for i in range(masks.shape[0]):
            for c in range(5):
                for raw in np.unique(masks[i, :, :, c]):
                    if raw:
                        found.add((f"fold{k}", i, c, int(raw)))
    keys = list(zip(pk["split"], pk["origin_index"], pk["origin_channel"], pk["origin_instance"]))
    assert len(keys) == len(set(keys)), "one truth row per instance"
    assert set(keys) == found
    assert (pk["origin_file"] == pk["split"].str.replace("fold", "", regex=False).map(
        lambda k: f"Fold {k}/masks/fold{k}/masks.npy")).all()
    assert (pk["origin_region"] == "").all() and (pk["kind"] == "nucleus").all()
    # the channel is the written label
    assert (pk["written_label"] == pk["origin_channel"].map(lambda c: syn.PANNUKE_LABELS[c])).all()


# ---------------------------------------------------------------------------------------------
# MoNuSAC format
# ---------------------------------------------------------------------------------------------
def test_monusac_release_folders_and_names(sample: syn.SampleInfo) -> None:
    train = sample.monusac_root / syn.MONUSAC_TRAIN_DIR
    test = sample.monusac_root / syn.MONUSAC_TEST_DIR
    train_pat = {p.name for p in train.iterdir()}
    test_pat = {p.name for p in test.iterdir()}
    assert len(train_pat) == 3 and len(test_pat) == 2 and not train_pat & test_pat
    barcode = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-01Z-00-DX1$")
    assert all(barcode.match(p) for p in train_pat | test_pat)
    styles = set()
    for xml in _xml_files(sample):
        suffix = xml.stem[len(xml.parent.name):]
        styles.add("_001" if re.fullmatch(r"_\d{3}", suffix) else "_1" if re.fullmatch(r"_\d{1,2}", suffix)
                   else "-1" if re.fullmatch(r"-\d+", suffix) else suffix)
    assert styles == {"_1", "-1", "_001"}


def test_monusac_images(sample: syn.SampleInfo) -> None:
    svs_only = rgba = 0
    for xml in _xml_files(sample):
        tif, svs = xml.with_suffix(".tif"), xml.with_suffix(".svs")
        assert tif.exists() != svs.exists()
        path = tif if tif.exists() else svs
        with tifffile.TiffFile(path) as tf:
            level0 = tf.series[0].levels[0].asarray()
            if svs.exists():
                svs_only += 1
                assert tf.pages[0].is_tiled and len(tf.series[0].levels) == 2
        level0 = level0.reshape(level0.shape[-3:])
        assert level0.dtype == np.uint8 and level0.shape[2] in (3, 4)
        h, w = level0.shape[:2]
        assert 300 <= min(h, w) and max(h, w) <= 421 and h % 256 and w % 256
        if level0.shape[2] == 4:
            rgba += 1
            assert (level0[..., 3] == 255).all()
    assert svs_only >= 1 and rgba >= 1


def test_monusac_xml_structure(sample: syn.SampleInfo) -> None:
    crlf = lf = layer4 = empty_blocks = dup_regions = 0
    for xml in _xml_files(sample):
        raw = xml.read_bytes()
        if b"\r\n" in raw:
            crlf += 1
            assert raw.count(b"\n") == raw.count(b"\r\n")
        else:
            lf += 1
        root = DET.fromstring(raw)
        assert root.tag == "Annotations"
        assert 0.24 <= float(root.get("MicronsPerPixel")) <= 0.26
        assert re.fullmatch(r"0\.\d{6}", root.get("MicronsPerPixel"))
        is_test = xml.parent.parent.name == syn.MONUSAC_TEST_DIR
        labels = []
        for ann in root.findall("Annotation"):
            labels.append(ann.find("Attributes/Attribute").get("Name"))
            layer4 += ann.get("Name") == "Layer 4"
            regions = ann.find("Regions")
            assert regions[0].tag == "RegionAttributeHeaders"
            empty_blocks += len(regions.findall("Region")) == 0
        expected = ["Epithelial", "Lymphocyte", "Neutrophil", "Macrophage"] + (["Ambiguous"] if is_test else [])
        assert labels == expected
        for _, _, reg, v in _regions(xml):
            x, y = v[:, 0], v[:, 1]
            area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
            length = np.hypot(*(np.roll(v, -1, axis=0) - v).T).sum()
            assert abs(float(reg.get("Area")) - area) <= 0.05 + 1e-9
            assert abs(float(reg.get("Length")) - length) <= 0.05 + 1e-9
            dup_regions += bool(np.any(np.all(v[1:] == v[:-1], axis=1)))
    assert crlf >= 1 and lf >= 1 and layer4 >= 1 and empty_blocks >= 1 and dup_regions >= 1


def test_monusac_truth_matches_xml(sample: syn.SampleInfo, truth: pd.DataFrame) -> None:
    mo = truth[truth["source"] == "monusac"]
    found = set()
    for xml in _xml_files(sample):
        rel = xml.relative_to(xml.parent.parent).as_posix()
        split = "test" if xml.parent.parent.name == syn.MONUSAC_TEST_DIR else "train"
        for label, rid, _, _ in _regions(xml):
            found.add((split, rel, label, rid))
    keys = list(zip(mo["split"], mo["origin_file"], mo["written_label"], mo["origin_region"]))
    assert len(keys) == len(set(keys))
    assert set(keys) == found
    assert ((mo["origin_index"] == -1) & (mo["origin_channel"] == -1) & (mo["origin_instance"] == -1)).all()
    ign = mo[mo["kind"] == "ignore"]
    assert len(ign) >= 1 and (ign["split"] == "test").all()
    assert (ign["written_label"] == "Ambiguous").all() and (ign["true_class"] == 255).all()
    assert not ign["flipped"].any()


# ---------------------------------------------------------------------------------------------
# truth, flips
# ---------------------------------------------------------------------------------------------
def test_truth_columns_and_flips(truth: pd.DataFrame, sample: syn.SampleInfo) -> None:
    assert list(truth.columns) == list(syn.TRUTH_COLUMNS)
    assert (truth["flipped"] == (truth["written_label"] != truth["true_label"])).all()
    nuc = truth[truth["kind"] == "nucleus"]
    tax = Taxonomy.default()
    for src in ("pannuke", "monusac"):
        part = nuc[nuc["source"] == src]
        assert abs(part["flipped"].mean() - FLIP) < 0.05, src
        for label, cls in zip(part["true_label"], part["true_class"]):
            assert cls in tax.candidates(src, label)
        labels = syn.PANNUKE_LABELS if src == "pannuke" else syn.MONUSAC_LABELS
        assert set(part["written_label"]) <= set(labels)
    # PanNuke Inflammatory and MoNuSAC Epithelial carry their true fine class
    pk = nuc[nuc["source"] == "pannuke"]
    assert set(pk.loc[pk["true_label"] == "Inflammatory", "true_class"]) == {2, 6, 7}
    mo = nuc[nuc["source"] == "monusac"]
    assert set(mo.loc[mo["true_label"] == "Epithelial", "true_class"]) == {1, 5}
    assert sample.n_nuclei == len(nuc) and sample.n_flipped == int(truth["flipped"].sum())


def test_no_flips_when_fraction_is_zero(tmp_path: Path) -> None:
    df = syn.write_pannuke(tmp_path / "pk", tiles_per_fold=(2, 0, 0), seed=3, flip_fraction=0.0)
    assert len(df) > 0 and not df["flipped"].any()
    assert not (tmp_path / "pk" / "Fold 2").exists()


# ---------------------------------------------------------------------------------------------
# separability sanity check
# ---------------------------------------------------------------------------------------------
def _pannuke_features(sample: syn.SampleInfo, truth: pd.DataFrame) -> pd.DataFrame:
    rows = []
    pk = truth[truth["source"] == "pannuke"]
    for k in (1, 2, 3):
        images, _, masks = _fold(sample, k)
        for (i, c, raw), cls in pk[pk["split"] == f"fold{k}"].set_index(
            ["origin_index", "origin_channel", "origin_instance"]
        )["true_class"].items():
            m = masks[i, :, :, c] == raw
            gray = np.asarray(images[i]).mean(axis=-1)[m]
            rows.append({"true_class": cls, "area_um2": m.sum() * syn.PANNUKE_MPP**2, "gray": gray.mean()})
    return pd.DataFrame(rows)


def test_classes_differ_in_size_and_stain(sample: syn.SampleInfo, truth: pd.DataFrame) -> None:
    f = _pannuke_features(sample, truth).groupby("true_class").mean()
    area = f["area_um2"]
    # Dead < Lymphocyte < Epithelial < Macrophage < Neoplastic
    assert area[4] < area[2] < area[5] < area[6] < area[1]
    assert 20 < area[2] < 45 and area[1] > 80
    # Macrophage pale, Lymphocyte and Dead dark
    assert f["gray"][6] > f["gray"][5] > f["gray"][2] > f["gray"][4]


def test_every_nucleus_is_one_connected_region(sample: syn.SampleInfo, truth: pd.DataFrame) -> None:
    """A nucleus is one outline (as an annotator draws it): its id must not cover separate pieces.
    Karyorrhectic Dead nuclei used to be 3-6 disjoint fragments under one id, which any model that
    segments pixels counts several times (it capped the ground-truth oracle's count R2 at ~0.87)."""
    from scipy import ndimage

    pk = truth[truth["source"] == "pannuke"]
    n_dead = 0
    for k in (1, 2, 3):
        _, _, masks = _fold(sample, k)
        for i, c, raw, cls in pk[pk["split"] == f"fold{k}"][
            ["origin_index", "origin_channel", "origin_instance", "true_class"]
        ].itertuples(index=False):
            _, n = ndimage.label(np.asarray(masks[i, :, :, c]) == raw)
            assert n == 1, f"fold{k} tile {i} channel {c} instance {raw} (class {cls}) has {n} pieces"
            n_dead += cls == syn._DEAD
    assert n_dead > 0, "the sample must hold Dead nuclei for the test to mean anything"


def test_karyorrhectic_outline_is_one_polygon_at_every_pixel_size() -> None:
    from scipy import ndimage

    for ppu in (2.0, 4.0):
        rng = np.random.default_rng(0)
        for _ in range(200):
            shape = syn._make_shape(syn._DEAD, rng, ppu)
            assert len(shape.polys) == 1 and ndimage.label(shape.mask)[1] == 1


# ---------------------------------------------------------------------------------------------
# determinism, fast path, atomicity, bad input
# ---------------------------------------------------------------------------------------------
def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _small(root: Path, seed: int) -> None:
    syn.write_pannuke(root / "pk", tiles_per_fold=(2, 1, 0), seed=seed, flip_fraction=0.3)
    syn.write_monusac(root / "mo", train_patients=2, test_patients=1, images_per_patient=(1, 2),
                      seed=seed, flip_fraction=0.3, image_size=(200, 260))


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    _small(tmp_path / "a", 7)
    _small(tmp_path / "b", 7)
    _small(tmp_path / "c", 8)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and len(a) > 8
    assert a["pk/Fold 1/images/fold1/images.npy"] != c["pk/Fold 1/images/fold1/images.npy"]


def test_unique_tiles_fast_path(tmp_path: Path) -> None:
    df = syn.write_pannuke(tmp_path, tiles_per_fold=(7, 0, 0), seed=1, flip_fraction=0.1,
                           empty_fraction=0.0, unique_tiles=3)
    masks = np.load(tmp_path / "Fold 1/masks/fold1/masks.npy", mmap_mode="r")
    types = np.load(tmp_path / "Fold 1/images/fold1/types.npy")
    cols = ["origin_channel", "origin_instance", "written_label", "true_class", "flipped"]
    for i in (3, 6):
        base, copy = df[df["origin_index"] == i % 3], df[df["origin_index"] == i]
        pd.testing.assert_frame_equal(base[cols].reset_index(drop=True), copy[cols].reset_index(drop=True))
        assert types[i] == types[i % 3]
        # the copy is a dihedral transform of its base tile: same instance areas per channel
        for c in range(5):
            a = np.unique(masks[i % 3, :, :, c], return_counts=True)
            b = np.unique(masks[i, :, :, c], return_counts=True)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_crash_leaves_no_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(syn, "_write_tiff", boom)
    out = tmp_path / "sample"
    with pytest.raises(OSError, match="disk full"):
        syn.write_sample(out, preset="tiny")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(StateError, match="already exists"):
        syn.write_sample(tmp_path / "full", preset="tiny")
    (tmp_path / "pk" / "Fold 1").mkdir(parents=True)
    with pytest.raises(StateError, match="Fold 1"):
        syn.write_pannuke(tmp_path / "pk", tiles_per_fold=(1, 0, 0))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: syn.write_pannuke(p, flip_fraction=1.5), "flip_fraction"),
        (lambda p: syn.write_pannuke(p, tiles_per_fold=(1, 2)), "tiles_per_fold"),
        (lambda p: syn.write_pannuke(p, tiles_per_fold=(1, -1, 0)), "tiles_per_fold"),
        (lambda p: syn.write_pannuke(p, seed=-1), "seed"),
        (lambda p: syn.write_pannuke(p, unique_tiles=0), "unique_tiles"),
        (lambda p: syn.write_pannuke(p, empty_fraction=-0.1), "empty_fraction"),
        (lambda p: syn.write_monusac(p, images_per_patient=(2, 1)), "images_per_patient"),
        (lambda p: syn.write_monusac(p, train_patients=0), "train_patients"),
        (lambda p: syn.write_sample(p / "s", preset="huge"), "preset"),  # type: ignore[arg-type]
    ],
)
def test_bad_options(tmp_path: Path, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        call(tmp_path)
    assert not any(tmp_path.rglob("*.npy"))


@pytest.mark.slow
def test_demo_preset_counts_and_separability(tmp_path: Path) -> None:
    from skimage.measure import regionprops
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    info = syn.write_sample(tmp_path / "demo", preset="demo", seed=0)
    truth = pd.read_parquet(info.truth_path)
    nuc = truth[truth["kind"] == "nucleus"]
    assert min(info.class_counts.values()) >= 250, info.class_counts
    for src in ("pannuke", "monusac"):
        per = nuc[nuc["source"] == src]["true_class"].value_counts()
        for cls in (1, 2, 5, 6, 7):  # both sources: Neoplastic, immune classes, Epithelial
            assert per.get(cls, 0) >= 150, (src, cls, per.to_dict())
    # handcrafted shape / stain features separate the true classes (PanNuke)
    X, y = [], []
    pk = nuc[(nuc["source"] == "pannuke") & (nuc["split"] == "fold1")]
    images, _, masks = _fold(info, 1)
    for (i, c), g in pk.groupby(["origin_index", "origin_channel"]):
        gray = np.asarray(images[i]).mean(axis=-1)
        props = {p.label: p for p in regionprops(np.asarray(masks[i, :, :, c]).astype(np.int32), gray)}
        for raw, cls in zip(g["origin_instance"], g["true_class"]):
            p = props[raw]
            vals = gray[p.slice][p.image]
            X.append([p.area, p.solidity, p.eccentricity, vals.mean(), vals.std(), p.euler_number])
            y.append(cls)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    assert cross_val_score(clf, np.array(X), np.array(y), cv=5).mean() >= 0.9
