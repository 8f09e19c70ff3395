"""Tests for cellcurate.datasets.pannuke: tiny exact tiles first, then real types.npy, bad inputs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellcurate.datasets import pannuke as pn
from cellcurate.datasets.pannuke import (
    PANNUKE_CHANNELS,
    PANNUKE_TISSUES,
    discover_pannuke,
    fold_fingerprint,
    iter_pannuke,
    iter_pannuke_fold,
    load_types,
    looks_like_pannuke,
    open_fold,
)
from cellcurate.datasets.records import SOURCE_NUCLEI_COLUMNS, IngestReport
from cellcurate.errors import InputFormatError, InputNotFoundError

FIXTURES = (Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "pannuke").resolve()
T = 256


# -- helpers ------------------------------------------------------------------------------------
def blank(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n float64 tiles in the release layout: images (n,256,256,3), masks (n,256,256,6)."""
    images = np.zeros((n, T, T, 3), dtype=np.float64)
    masks = np.zeros((n, T, T, 6), dtype=np.float64)
    masks[..., 5] = 1.0  # background everywhere until a nucleus is drawn
    return images, masks


def draw(masks: np.ndarray, tile: int, channel: int, raw_id: float, rows: slice, cols: slice) -> None:
    masks[tile, rows, cols, channel] = raw_id
    masks[tile, rows, cols, 5] = 0.0


def write_fold(root: Path, k: int, images: np.ndarray, masks: np.ndarray,
               types: np.ndarray | None = None) -> Path:
    """Write one fold as the release does: ``Fold k/images/foldk/...``; returns the Fold folder."""
    folder = root / f"Fold {k}"
    (folder / "images" / f"fold{k}").mkdir(parents=True, exist_ok=True)
    (folder / "masks" / f"fold{k}").mkdir(parents=True, exist_ok=True)
    np.save(folder / "images" / f"fold{k}" / "images.npy", images)
    np.save(folder / "masks" / f"fold{k}" / "masks.npy", masks)
    if types is None:
        types = np.array([PANNUKE_TISSUES[i % len(PANNUKE_TISSUES)] for i in range(len(images))], dtype="<U13")
    np.save(folder / "images" / f"fold{k}" / "types.npy", types)
    return folder


def read_all(path: Path, **kw) -> tuple[list, IngestReport]:
    report = IngestReport()
    items = list(iter_pannuke(path, report=report, **kw))
    return items, report


# -- tiny exact cases ---------------------------------------------------------------------------
def test_ids_colliding_across_channels_are_distinct_instances(tmp_path):
    images, masks = blank(1)
    draw(masks, 0, 0, 5, slice(0, 4), slice(0, 4))  # Neoplastic id 5
    draw(masks, 0, 1, 5, slice(10, 12), slice(10, 13))  # Inflammatory id 5: same raw id
    write_fold(tmp_path, 1, images, masks)
    (item,), report = read_all(tmp_path)
    item.validate()
    assert item.nuclei["instance_id"].tolist() == [1, 2]
    assert item.nuclei["origin_channel"].tolist() == [0, 1]
    assert item.nuclei["origin_instance"].tolist() == [5, 5]
    assert item.nuclei["source_label"].tolist() == ["Neoplastic", "Inflammatory"]
    assert (item.instances[0:4, 0:4] == 1).all() and (item.instances[10:12, 10:13] == 2).all()
    assert np.count_nonzero(item.instances) == 16 + 6
    assert report.counts["overlap_pixels"] == 0
    assert report.counts["nuclei"] == 2


def test_noncontiguous_ids_relabel_to_1_n_by_channel_then_id(tmp_path):
    images, masks = blank(1)
    draw(masks, 0, 2, 1000, slice(0, 2), slice(0, 2))
    draw(masks, 0, 2, 7, slice(5, 6), slice(5, 8))
    draw(masks, 0, 2, 30, slice(20, 21), slice(0, 1))
    draw(masks, 0, 0, 42, slice(100, 103), slice(100, 101))
    write_fold(tmp_path, 1, images, masks)
    (item,), _ = read_all(tmp_path)
    item.validate()
    nuc = item.nuclei
    assert nuc["instance_id"].tolist() == [1, 2, 3, 4]
    assert list(zip(nuc["origin_channel"], nuc["origin_instance"])) == [(0, 42), (2, 7), (2, 30), (2, 1000)]
    expected = np.zeros((T, T), np.int32)
    expected[100:103, 100:101] = 1
    expected[5:6, 5:8] = 2
    expected[20:21, 0:1] = 3
    expected[0:2, 0:2] = 4
    np.testing.assert_array_equal(item.instances, expected)


def _binarize_official(x: np.ndarray) -> np.ndarray:
    """PanNuke-metrics ``utils.binarize`` (TissueImageAnalytics/PanNuke-metrics), as published:
    channels in order, each instance overwrites what was there (the highest channel wins)."""
    out = np.zeros([x.shape[0], x.shape[1]])
    count = 1
    for i in range(x.shape[2]):
        x_ch = x[:, :, i]
        unique_vals = np.unique(x_ch).tolist()
        unique_vals.remove(0)
        for j in unique_vals:
            x_tmp = x_ch == j
            out *= 1 - x_tmp
            out += count * x_tmp
            count += 1
    return out.astype("int32")


def test_overlap_highest_channel_wins_as_the_official_evaluation(tmp_path):
    """Issue 10: the lowest channel used to win, so a Connective nucleus drawn over a Neoplastic
    one lost those pixels and one lying wholly inside it was dropped."""
    images, masks = blank(1)
    draw(masks, 0, 0, 3, slice(0, 10), slice(0, 10))  # Neoplastic, 100 px
    draw(masks, 0, 2, 4, slice(5, 15), slice(5, 15))  # Connective over it: 25 px claimed twice
    draw(masks, 0, 3, 2, slice(1, 3), slice(1, 3))  # Dead, wholly inside the Neoplastic one
    write_fold(tmp_path, 1, images, masks)
    (item,), report = read_all(tmp_path)
    item.validate()
    assert list(zip(item.nuclei["origin_channel"], item.nuclei["origin_instance"])) == [(0, 3), (2, 4), (3, 2)]
    assert np.count_nonzero(item.instances == 1) == 100 - 25 - 4
    assert np.count_nonzero(item.instances == 2) == 100 and (item.instances[5:10, 5:10] == 2).all()
    assert np.count_nonzero(item.instances == 3) == 4  # the covered nucleus is kept
    assert report.counts["overlap_pixels"] == 25 + 4 and report.counts["instances_lost_to_overlap"] == 0
    # the same partition as the official binarize (ids aside)
    official = _binarize_official(masks[0, :, :, :5])
    assert np.array_equal(item.instances > 0, official > 0)
    pairs = set(zip(item.instances.ravel().tolist(), official.ravel().tolist()))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # one-to-one


def test_overlap_rule_is_recorded_and_part_of_the_fingerprint(tmp_path):
    import json

    from cellcurate.datasets.ingest import ingest_pannuke
    from cellcurate.datasets.store import Store
    from cellcurate.errors import ConfigError, StateError

    images, masks = blank(1)
    draw(masks, 0, 0, 3, slice(0, 10), slice(0, 10))
    draw(masks, 0, 2, 4, slice(5, 15), slice(5, 15))
    write_fold(tmp_path / "src", 1, images, masks)
    with Store.create(tmp_path / "store") as store:
        ingest_pannuke(store, tmp_path / "src", progress=False)
        unit_dir = store.path / store.units()["dir"].iloc[0]
        assert json.loads((unit_dir / "report.json").read_text())["settings"] == {"pannuke_overlap": "highest"}
        with pytest.raises(StateError, match="--overwrite"):
            ingest_pannuke(store, tmp_path / "src", progress=False, overlap="lowest")
        ingest_pannuke(store, tmp_path / "src", progress=False, overlap="lowest", overwrite=True)
        unit_dir = store.path / store.units()["dir"].iloc[0]
        assert json.loads((unit_dir / "report.json").read_text())["settings"] == {"pannuke_overlap": "lowest"}
        with pytest.raises(ConfigError, match="unknown PanNuke overlap rule"):
            ingest_pannuke(store, tmp_path / "src", progress=False, overlap="first")


def test_overlap_lowest_rule_lower_channel_wins_and_losers_are_counted(tmp_path):
    images, masks = blank(2)
    draw(masks, 1, 0, 3, slice(0, 10), slice(0, 10))  # Neoplastic, 100 px
    draw(masks, 1, 1, 4, slice(5, 15), slice(5, 15))  # Inflammatory, 25 px under Neoplastic
    draw(masks, 1, 3, 2, slice(0, 3), slice(0, 3))  # Dead, entirely under Neoplastic -> lost
    draw(masks, 1, 4, 9, slice(7, 8), slice(7, 8))  # Epithelial, one pixel claimed 3 times -> lost
    write_fold(tmp_path, 1, images, masks)
    items, report = read_all(tmp_path, overlap="lowest")
    item = items[1]
    item.validate()
    assert list(zip(item.nuclei["origin_channel"], item.nuclei["origin_instance"])) == [(0, 3), (1, 4)]
    assert np.count_nonzero(item.instances == 1) == 100
    assert np.count_nonzero(item.instances == 2) == 75
    assert (item.instances[5:10, 5:10] == 1).all()
    assert report.counts["overlap_pixels"] == 25 + 9  # each pixel once, however many claims
    assert report.counts["instances_lost_to_overlap"] == 2
    (warning,) = report.warnings
    assert warning.startswith("Fold 1/masks/fold1/masks.npy: tile 1: 2 instance(s)")
    assert "Dead id 2" in warning and "Epithelial id 9" in warning


def test_empty_tile_is_kept_with_no_nuclei(tmp_path):
    images, masks = blank(2)
    images[0] = 200.0
    draw(masks, 1, 0, 1, slice(0, 1), slice(0, 1))
    write_fold(tmp_path, 1, images, masks)
    items, report = read_all(tmp_path)
    assert [it.key for it in items] == ["fold1/00000", "fold1/00001"]
    empty = items[0]
    empty.validate()
    assert len(empty.nuclei) == 0
    assert list(empty.nuclei.columns) == list(SOURCE_NUCLEI_COLUMNS)
    assert [str(d) for d in empty.nuclei.dtypes] == list(SOURCE_NUCLEI_COLUMNS.values())
    assert not empty.instances.any() and empty.instances.dtype == np.int32
    assert (empty.image == 200).all()
    assert report.counts["images"] == 2 and report.counts["images_without_nuclei"] == 1


def test_nuclei_table_dtypes_and_constant_columns(tmp_path):
    images, masks = blank(1)
    draw(masks, 0, 4, 11, slice(0, 2), slice(0, 2))
    write_fold(tmp_path, 1, images, masks)
    (item,), _ = read_all(tmp_path)
    assert list(item.nuclei.columns) == list(SOURCE_NUCLEI_COLUMNS)
    assert [str(d) for d in item.nuclei.dtypes] == list(SOURCE_NUCLEI_COLUMNS.values())
    row = item.nuclei.iloc[0]
    assert (row["kind"], row["source_label"], row["origin_region"]) == ("nucleus", "Epithelial", "")
    assert all(row[c] == "" for c in SOURCE_NUCLEI_COLUMNS if c == "origin_annotation")


@pytest.mark.parametrize("given", ["root", "fold"])
def test_origin_fields(tmp_path, given):
    images, masks = blank(2)
    draw(masks, 1, 1, 8, slice(0, 2), slice(0, 2))
    types = np.array(["Breast", "HeadNeck"], dtype="<U13")
    folder = write_fold(tmp_path, 2, images, masks, types)
    items, _ = read_all(tmp_path if given == "root" else folder)
    item = items[1]
    assert item.key == "fold2/00001" and item.split == "fold2"
    assert item.origin_file == "Fold 2/images/fold2/images.npy"
    assert item.annotation_file == "Fold 2/masks/fold2/masks.npy"
    assert item.origin_index == 1 and item.mpp == 0.25
    assert item.tissue == "HeadNeck" and items[0].tissue == "Breast"
    assert item.patient_id is None


def test_image_float_to_uint8_rounds_exactly(tmp_path):
    images, masks = blank(1)
    images[0, 0, 0] = [0.0, 127.0, 255.0]
    images[0, 0, 1] = [12.4, 12.6, 254.5]  # not integral: rounded half to even, counted
    write_fold(tmp_path, 1, images, masks)
    (item,), report = read_all(tmp_path)
    assert item.image.dtype == np.uint8 and item.image.shape == (T, T, 3)
    assert item.image[0, 0].tolist() == [0, 127, 255]
    assert item.image[0, 1].tolist() == [12, 13, 254]
    assert report.counts["image_values_rounded"] == 3


def test_uint8_images_and_integer_masks_are_accepted(tmp_path):
    images, masks = blank(1)
    draw(masks, 0, 2, 3, slice(0, 2), slice(0, 2))
    images[0, 5, 5] = [1, 2, 3]
    write_fold(tmp_path, 1, images.astype(np.uint8), masks.astype(np.int32))
    (item,), _ = read_all(tmp_path)
    assert item.image[5, 5].tolist() == [1, 2, 3]
    assert item.nuclei["origin_instance"].tolist() == [3]


def test_background_channel_disagreement_is_counted(tmp_path):
    images, masks = blank(1)
    draw(masks, 0, 0, 1, slice(0, 2), slice(0, 2))
    masks[0, 0, 0, 5] = 1.0  # background flag on a nucleus pixel
    masks[0, 50, 50, 5] = 0.0  # no flag on a background pixel
    write_fold(tmp_path, 1, images, masks)
    _, report = read_all(tmp_path)
    assert report.counts["background_channel_disagreement_pixels"] == 2


def test_huge_ids_take_the_sorting_path(tmp_path):
    images, masks = blank(1)
    draw(masks, 0, 1, 2.0**40, slice(0, 2), slice(0, 2))
    draw(masks, 0, 1, 10_000_000, slice(4, 5), slice(0, 2))
    draw(masks, 0, 0, 2.0**40, slice(1, 3), slice(1, 3))  # overlaps the first one
    write_fold(tmp_path, 1, images, masks)
    (item,), report = read_all(tmp_path)
    item.validate()
    assert list(zip(item.nuclei["origin_channel"], item.nuclei["origin_instance"])) == [
        (0, 2**40), (1, 10_000_000), (1, 2**40)]
    assert np.count_nonzero(item.instances == 1) == 3  # its overlap pixel goes to the higher channel
    assert np.count_nonzero(item.instances == 2) == 2
    assert np.count_nonzero(item.instances == 3) == 4
    assert report.counts["overlap_pixels"] == 1


def test_batches_and_ranges_give_the_same_tiles(tmp_path):
    rng = np.random.default_rng(3)
    images, masks = blank(5)
    images[:] = rng.integers(0, 256, images.shape)
    for t in range(5):
        for c in range(5):
            r, q = rng.integers(0, 240, 2)
            draw(masks, t, c, float(rng.integers(1, 500)), slice(r, r + 9), slice(q, q + 7))
    write_fold(tmp_path, 1, images, masks)
    (fold,) = discover_pannuke(tmp_path)
    whole = list(iter_pannuke_fold(fold))
    for kw in ({"batch_size": 2}, {"batch_size": 1, "start": 1, "stop": 4}, {"batch_size": 3, "start": 2}):
        part = list(iter_pannuke_fold(fold, **kw))
        ref = whole[kw.get("start", 0): kw.get("stop", 5)]
        assert [p.key for p in part] == [r.key for r in ref]
        for p, r in zip(part, ref):
            np.testing.assert_array_equal(p.image, r.image)
            np.testing.assert_array_equal(p.instances, r.instances)
            pd.testing.assert_frame_equal(p.nuclei, r.nuclei)
    np.testing.assert_array_equal(whole[4].image, images[4].astype(np.uint8))


def test_yielded_arrays_do_not_alias_the_file(tmp_path):
    images, masks = blank(3)
    images[:] = 7.0
    write_fold(tmp_path, 1, images.astype(np.uint8), masks)
    items = list(iter_pannuke_fold(discover_pannuke(tmp_path)[0], batch_size=2))  # kept past their batch
    # the file is mapped read-only: writable arrays are copies, safe to keep past their batch
    assert all(it.image.flags.writeable and it.instances.flags.writeable for it in items)
    assert all((it.image == 7).all() for it in items)
    items[0].image[:] = 0
    assert (items[1].image == 7).all()


# -- real types.npy -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, n", [("fold1", 2656), ("fold3", 2722)])
def test_real_types_npy(name, n):
    path = FIXTURES / f"{name}_types.npy"
    if not path.exists():
        pytest.skip(f"fixture {path} not available")
    types = load_types(path, n=n)
    assert types.shape == (n,)
    counts = Counter(types.tolist())
    assert set(counts) == set(PANNUKE_TISSUES) and len(PANNUKE_TISSUES) == 19
    assert sum(counts.values()) == n
    rows = pd.read_csv(FIXTURES / f"{name}_cell_count.csv")
    assert len(rows) == n
    with pytest.raises(InputFormatError, match="types.npy has"):
        load_types(path, n=n + 1)


def test_bytes_types_are_decoded(tmp_path):
    path = tmp_path / "types.npy"
    np.save(path, np.array([b"Colon ", b"Skin"], dtype="S6"))
    assert load_types(path).tolist() == ["Colon", "Skin"]


def test_empty_fold_yields_nothing_and_warns(tmp_path):
    images, masks = blank(0)
    write_fold(tmp_path, 1, images, masks, np.zeros(0, dtype="<U13"))
    items, report = read_all(tmp_path)
    assert items == [] and report.warnings == ["Fold 1/images/fold1/images.npy: images.npy holds no tiles"]


def test_unknown_tissue_warns(tmp_path):
    images, masks = blank(1)
    write_fold(tmp_path, 1, images, masks, np.array(["Brain"], dtype="<U13"))
    (item,), report = read_all(tmp_path)
    assert item.tissue == "Brain"
    assert report.warnings == ["Fold 1/images/fold1/types.npy: unknown tissue name 'Brain' (kept as written)"]


# -- bad inputs (table-driven) ------------------------------------------------------------------
def _truncate_images(folder: Path) -> None:
    p = folder / "images/fold1/images.npy"
    p.write_bytes(p.read_bytes()[:-1000])


def _truncate_header(folder: Path) -> None:
    p = folder / "masks/fold1/masks.npy"
    p.write_bytes(p.read_bytes()[:20])


def _string_images(folder: Path) -> None:
    np.save(folder / "images/fold1/images.npy", np.array(["a", "b"], dtype="<U5"))


def _object_masks(folder: Path) -> None:
    arr = np.empty(2, dtype=object)
    arr[:] = [{"x": 1}, None]
    np.save(folder / "masks/fold1/masks.npy", arr, allow_pickle=True)


def _masks_other_n(folder: Path) -> None:
    np.save(folder / "masks/fold1/masks.npy", np.zeros((3, T, T, 6)))


def _masks_five_channels(folder: Path) -> None:
    np.save(folder / "masks/fold1/masks.npy", np.zeros((2, T, T, 5)))


def _images_small_tiles(folder: Path) -> None:
    np.save(folder / "images/fold1/images.npy", np.zeros((2, 128, 128, 3)))


def _no_types(folder: Path) -> None:
    (folder / "images/fold1/types.npy").unlink()


def _no_masks(folder: Path) -> None:
    (folder / "masks/fold1/masks.npy").unlink()


def _types_short(folder: Path) -> None:
    np.save(folder / "images/fold1/types.npy", np.array(["Colon"], dtype="<U13"))


def _types_numeric(folder: Path) -> None:
    np.save(folder / "images/fold1/types.npy", np.zeros(2))


def _edit_images(value: float):
    def edit(folder: Path) -> None:
        images = np.load(folder / "images/fold1/images.npy")
        images[1, 3, 4, 2] = value
        np.save(folder / "images/fold1/images.npy", images)
    return edit


def _edit_masks(value: float, channel: int = 1):
    def edit(folder: Path) -> None:
        masks = np.load(folder / "masks/fold1/masks.npy")
        masks[1, 9, 9, channel] = value
        np.save(folder / "masks/fold1/masks.npy", masks)
    return edit


def _fortran_masks(folder: Path) -> None:
    np.save(folder / "masks/fold1/masks.npy", np.asfortranarray(np.zeros((2, T, T, 6))))


BAD = [
    ("truncated images", _truncate_images, InputFormatError, r"images\.npy.*truncated"),
    ("truncated header", _truncate_header, InputFormatError, r"masks\.npy: not a valid \.npy"),
    ("string images", _string_images, InputFormatError, r"images\.npy must be numeric, got dtype <U5"),
    ("object masks", _object_masks, InputFormatError, r"masks\.npy must be numeric, got dtype \|O"),
    ("masks other N", _masks_other_n, InputFormatError, r"masks\.npy has 3 tiles, images\.npy has 2"),
    ("masks 5 channels", _masks_five_channels, InputFormatError, r"masks\.npy has 5 channels, expected 6"),
    ("images 128x128", _images_small_tiles, InputFormatError, r"images\.npy must be \(N, 256, 256, 3\)"),
    ("missing types", _no_types, InputNotFoundError, r"types\.npy not found"),
    ("missing masks", _no_masks, InputNotFoundError, r"masks\.npy not found"),
    ("types short", _types_short, InputFormatError, r"types\.npy has 1 entries, images\.npy has 2"),
    ("types numeric", _types_numeric, InputFormatError, r"types\.npy must hold strings"),
    ("image above 255", _edit_images(256.0), InputFormatError, r"images\.npy tile 1 holds values outside"),
    ("image negative", _edit_images(-1.0), InputFormatError, r"images\.npy tile 1 holds values outside"),
    ("image NaN", _edit_images(np.nan), InputFormatError, r"images\.npy tile 1 holds values outside"),
    ("mask fraction", _edit_masks(2.5), InputFormatError, r"masks\.npy tile 1 holds mask ids"),
    ("mask negative", _edit_masks(-3.0, 4), InputFormatError, r"masks\.npy tile 1 holds mask ids"),
    ("mask NaN", _edit_masks(np.nan, 0), InputFormatError, r"masks\.npy tile 1 holds mask ids"),
    ("fortran masks", _fortran_masks, InputFormatError, r"masks\.npy is Fortran-ordered"),
    ("mask inf", _edit_masks(np.inf, 2), InputFormatError, r"masks\.npy tile 1 holds mask ids"),
]


@pytest.mark.parametrize("name, edit, exc, msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(tmp_path, name, edit, exc, msg):
    images, masks = blank(2)
    draw(masks, 1, 0, 1, slice(0, 2), slice(0, 2))
    folder = write_fold(tmp_path, 1, images, masks)
    edit(folder)
    with pytest.raises(exc, match=msg) as info:
        list(iter_pannuke(tmp_path))
    text = str(info.value)
    assert "\n" not in text
    assert str(folder) in text  # names the file


def test_mask_background_channel_is_not_validated_as_ids(tmp_path):
    images, masks = blank(1)
    masks[0, 0, 0, 5] = 0.5  # odd background value: only counted, never an error
    write_fold(tmp_path, 1, images, masks)
    (item,), _ = read_all(tmp_path)
    assert len(item.nuclei) == 0


def test_error_while_streaming_comes_after_earlier_tiles(tmp_path):
    images, masks = blank(3)
    masks[2, 0, 0, 3] = 1.5
    write_fold(tmp_path, 1, images, masks)
    got = []
    with pytest.raises(InputFormatError, match="tile 2"):
        for item in iter_pannuke(tmp_path):
            got.append(item.key)
    assert got == ["fold1/00000", "fold1/00001"]


def test_folder_with_neither_dataset(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert not looks_like_pannuke(tmp_path)
    assert not looks_like_pannuke(tmp_path / "missing")
    with pytest.raises(InputNotFoundError, match="holds no PanNuke fold"):
        list(iter_pannuke(tmp_path))
    with pytest.raises(InputNotFoundError, match="not found"):
        discover_pannuke(tmp_path / "missing")
    with pytest.raises(InputFormatError, match="got a file"):
        discover_pannuke(tmp_path / "notes.txt")


# -- discovery and fingerprint ------------------------------------------------------------------
def test_discover_release_root_with_three_folds(tmp_path):
    for k in (3, 1, 2):
        images, masks = blank(1)
        draw(masks, 0, k - 1, k, slice(0, 1), slice(0, 1))
        write_fold(tmp_path, k, images, masks)
    (tmp_path / "README.txt").write_text("PanNuke")
    folds = discover_pannuke(tmp_path)
    assert [f.fold for f in folds] == [1, 2, 3]
    assert all(f.root == tmp_path for f in folds)
    assert folds[1].images == tmp_path / "Fold 2" / "images" / "fold2" / "images.npy"
    assert folds[1].types == tmp_path / "Fold 2" / "images" / "fold2" / "types.npy"
    assert folds[1].masks == tmp_path / "Fold 2" / "masks" / "fold2" / "masks.npy"
    assert looks_like_pannuke(tmp_path)
    items, report = read_all(tmp_path)
    assert [it.key for it in items] == ["fold1/00000", "fold2/00000", "fold3/00000"]
    assert [it.nuclei["source_label"].iloc[0] for it in items] == list(PANNUKE_CHANNELS[:3])
    assert report.counts["images"] == 3


def test_discover_single_fold_folder(tmp_path):
    images, masks = blank(1)
    folder = write_fold(tmp_path, 2, images, masks)
    (fold,) = discover_pannuke(folder)
    assert fold.fold == 2 and fold.root == tmp_path
    assert fold.rel(fold.images) == "Fold 2/images/fold2/images.npy"
    assert looks_like_pannuke(folder)
    arrays = open_fold(fold)
    assert arrays.n == 1 and arrays.images.shape == (1, T, T, 3) and arrays.masks.shape == (1, T, T, 6)


def test_fold_fingerprint_is_content_sensitive(tmp_path):
    images, masks = blank(2)
    write_fold(tmp_path / "a", 1, images, masks)
    write_fold(tmp_path / "b", 1, images, masks)
    (fa,), (fb,) = discover_pannuke(tmp_path / "a"), discover_pannuke(tmp_path / "b")
    fp = fold_fingerprint(fa)
    assert fp.startswith("pannuke-fold-v3:") and len(fp) == 16 + 32 and fp == fold_fingerprint(fb)  # other place
    masks[1, 255, 255, 0] = 4.0  # last bytes of masks.npy
    write_fold(tmp_path / "b", 1, images, masks)
    assert fold_fingerprint(fb) != fp
    masks[1, 255, 255, 0] = 0.0
    write_fold(tmp_path / "b", 1, images, masks)
    assert fold_fingerprint(fb) == fp
    np.save(fb.types, np.array(["Colon", "Skin"], dtype="<U13"))
    assert fold_fingerprint(fb) != fold_fingerprint(fa)


def test_fold_fingerprint_sees_an_edit_in_the_middle_of_a_large_fold(tmp_path):
    """Issue 10: the old fingerprint hashed the first/last MiB and 16 4-KiB blocks only."""
    images, masks = blank(8)  # masks.npy: 8 x 256 x 256 x 6 float64 = 24 MiB
    folder = write_fold(tmp_path, 1, images, masks)
    (fold,) = discover_pannuke(folder)
    before = fold_fingerprint(fold)
    arr = np.load(fold.masks, mmap_mode="r+")
    arr[4, 100:110, 100:110, 0] = 7.0  # a nucleus added in tile 4 (middle of the file)
    arr[4, 100:110, 100:110, 5] = 0.0
    arr.flush()
    del arr
    size = fold.masks.stat().st_size
    header = size - masks.nbytes
    first = header + (4 * T * T + 100 * T + 100) * 6 * 8
    last = header + (4 * T * T + 109 * T + 109) * 6 * 8 + 6 * 8
    sampled = [(0, 1 << 20), (size - (1 << 20), size)] + [(size * j // 17, size * j // 17 + 4096) for j in range(1, 17)]
    assert not any(a < last and first < b for a, b in sampled)  # the edit lies outside what was sampled
    assert fold_fingerprint(fold) != before


def test_open_fold_returns_memmaps_and_types(tmp_path):
    images, masks = blank(1)
    write_fold(tmp_path, 1, images, masks)
    (fold,) = discover_pannuke(tmp_path)
    arrays = open_fold(fold)
    assert isinstance(arrays.images, np.memmap) and isinstance(arrays.masks, np.memmap)
    assert arrays.types.dtype == object


def test_batch_size_and_range_are_checked(tmp_path):
    images, masks = blank(1)
    write_fold(tmp_path, 1, images, masks)
    (fold,) = discover_pannuke(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_pannuke_fold(fold, batch_size=0))
    with pytest.raises(ValueError, match="start"):
        list(iter_pannuke_fold(fold, start=2))


def test_streaming_releases_pages_without_mapping_the_file_whole(tmp_path):
    # the mapped reader drops each batch's pages; the fallback copies into one buffer
    images, masks = blank(4)
    write_fold(tmp_path, 1, images, masks)
    (fold,) = discover_pannuke(tmp_path)
    arrays = open_fold(fold)
    reader = pn._BatchReader(arrays.masks, fold.masks, 2)
    try:
        batch = reader.read(2, 4)
        assert batch.shape == (2, T, T, 6)
        np.testing.assert_array_equal(batch, masks[2:4])
        reader.release(2, 4)
        np.testing.assert_array_equal(reader.read(2, 4), masks[2:4])  # pages come back on access
    finally:
        reader.close()


def test_copying_reader_matches_mapped_reader(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    images, masks = blank(3)
    images[:] = rng.integers(0, 256, images.shape)
    draw(masks, 2, 3, 17, slice(40, 50), slice(40, 45))
    write_fold(tmp_path, 1, images, masks)
    mapped = list(iter_pannuke(tmp_path))
    monkeypatch.delattr("mmap.MADV_DONTNEED")  # platforms without madvise: readinto a buffer
    copied = list(iter_pannuke_fold(discover_pannuke(tmp_path)[0], batch_size=2))
    for a, b in zip(mapped, copied, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.instances, b.instances)
        pd.testing.assert_frame_equal(a.nuclei, b.nuclei)
    assert copied[2].nuclei["origin_instance"].tolist() == [17]


# -- the block path of ingest (convert_pannuke_tiles) against the tile-by-tile path -------------
def _tile_by_tile(arrays, start, stop, overlap="highest"):
    from cellcurate.datasets.store import convert_image
    from cellcurate.datasets.taxonomy import Taxonomy

    report, blocks = IngestReport(), []
    out = [convert_image(item, source="pannuke", taxonomy=Taxonomy.default())
           for item in iter_pannuke_fold(arrays, start=start, stop=stop, overlap=overlap, report=report,
                                         fold_warnings=False, blocks=blocks)]
    return out, report, blocks


def _by_block(arrays, start, stop, overlap="highest"):
    from cellcurate.datasets.taxonomy import Taxonomy

    report, blocks = IngestReport(), []
    out = pn.convert_pannuke_tiles(arrays, start, stop, source="pannuke", taxonomy=Taxonomy.default(),
                                   overlap=overlap, report=report, blocks=blocks)
    return out, report, blocks


def _assert_same_conversion(a, b):
    (xs, rx, bx), (ys, ry, by) = a, b
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert (x.key, x.row) == (y.key, y.row)
        for arr in ("image", "instances"):
            u, v = getattr(x, arr), getattr(y, arr)
            assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v), arr
        assert list(x.cols) == list(y.cols)
        for name in x.cols:
            u, v = x.cols[name], y.cols[name]
            assert u.shape == v.shape and u.dtype.kind == v.dtype.kind and np.array_equal(u, v), name
            if u.dtype.kind == "f":
                assert u.dtype == v.dtype and u.tobytes() == v.tobytes(), name  # centroids bit for bit
    assert rx.as_dict() == ry.as_dict() and rx.warnings == ry.warnings
    assert bx == by


def _hand_made_block(tmp_path):
    """Seven tiles with every case the conversion has: overlaps (a pixel claimed by three
    channels), an instance that loses every pixel, one raw id in two channels, an empty tile,
    fractional image values, background disagreement, nuclei touching the tile's edges and
    holes (several runs per row), and a tile of ids past the lookup table."""
    images, masks = blank(7)
    rng = np.random.default_rng(3)
    images[:] = rng.integers(0, 256, images.shape)
    images[1, 0, 0, 0] = 10.5  # rounded half to even, counted
    images[1, 5, 5, 1] = 254.7
    draw(masks, 0, 0, 4, slice(0, 20), slice(0, 20))  # Neoplastic 4 ...
    draw(masks, 0, 2, 4, slice(10, 30), slice(10, 30))  # ... under Connective 4 (the same raw id)
    draw(masks, 0, 4, 9, slice(15, 18), slice(0, 40))  # Epithelial over both: a pixel claimed three times
    draw(masks, 0, 1, 7, slice(200, 256), slice(230, 256))  # touches the bottom-right corner
    draw(masks, 1, 1, 3, slice(50, 60), slice(50, 60))  # Inflammatory 3, lost under Dead 2 entirely
    draw(masks, 1, 3, 2, slice(48, 62), slice(48, 62))
    draw(masks, 1, 0, 12, slice(100, 140), slice(100, 140))
    masks[1, 110:130, 110:130, 0] = 0  # a hole: two runs on the rows through it
    masks[1, 110:130, 118:121, 0] = 12  # and a bar inside it: three runs
    masks[1, 0, 0, 5] = 0.0  # background flag off on a background pixel
    masks[1, 100, 100, 5] = 1.0  # and on on a nucleus pixel
    # tile 2: empty
    for k in range(12):  # tile 3: many small nuclei in every channel, ids not in order
        draw(masks, 3, k % 5, 40 - k, slice(10 * k, 10 * k + 6), slice(3 * k, 3 * k + 8))
    draw(masks, 4, 2, 2**40, slice(0, 5), slice(0, 5))  # tile 4: ids past the lookup table
    draw(masks, 4, 2, 2**40 + 1, slice(3, 9), slice(3, 9))
    draw(masks, 4, 0, 1, slice(250, 256), slice(0, 256))  # a full-width band: one run per row
    draw(masks, 5, 4, 1, slice(0, 256), slice(0, 256))  # tile 5: one nucleus over the whole tile
    draw(masks, 6, 3, 5, slice(128, 129), slice(7, 8))  # tile 6: a one-pixel nucleus
    return write_fold(tmp_path, 1, images, masks)


@pytest.mark.parametrize("overlap", ["highest", "lowest"])
def test_block_path_matches_tile_by_tile_on_hand_made_tiles(tmp_path, overlap):
    _hand_made_block(tmp_path)
    arrays = open_fold(discover_pannuke(tmp_path)[0])
    tiles = _tile_by_tile(arrays, 0, 7, overlap)
    _assert_same_conversion(tiles, _by_block(arrays, 0, 7, overlap))
    _assert_same_conversion(_tile_by_tile(arrays, 2, 5, overlap), _by_block(arrays, 2, 5, overlap))
    counts = tiles[1].counts
    assert counts["overlap_pixels"] > 0 and counts["image_values_rounded"] == 2
    assert counts["background_channel_disagreement_pixels"] >= 2 and counts["images_without_nuclei"] == 1
    if overlap == "highest":
        assert counts["instances_lost_to_overlap"] == 1 and "Inflammatory id 3" in tiles[1].warnings[0]


def test_block_path_matches_tile_by_tile_on_random_tiles(tmp_path):
    from cellcurate.datasets.synthetic import write_pannuke

    write_pannuke(tmp_path, tiles_per_fold=(70, 0, 0), seed=4, unique_tiles=9)
    arrays = open_fold(discover_pannuke(tmp_path / "Fold 1")[0])
    for start, stop in ((0, 64), (64, 70)):
        _assert_same_conversion(_tile_by_tile(arrays, start, stop), _by_block(arrays, start, stop))


def test_block_path_geometry_is_instance_geometrys():
    from cellcurate.datasets.store import instance_geometry

    rng = np.random.default_rng(8)
    for _ in range(20):
        tile = np.zeros((T, T, 6))
        for _ in range(int(rng.integers(0, 30))):
            y, x = rng.integers(0, T, 2)
            hh, ww = rng.integers(1, 40, 2)
            tile[y : y + hh, x : x + ww, int(rng.integers(0, 5))] = rng.integers(1, 9)
        res = pn._convert_mask(tile)
        geo = pn._runs_geometry([pn._tile_runs(res, T)], np.array([res.channels.size]), (T, T))
        want = instance_geometry(res.instances, res.channels.size)
        for key in ("area", "cy", "cx", "bbox"):
            assert geo[key].dtype == want[key].dtype and geo[key].tobytes() == want[key].tobytes(), key


BAD_BLOCKS = [  # (tile, channel or "image", value): each block path error is the tile-by-tile one
    [(1, 1, 2.5)], [(1, 4, -3.0)], [(1, 0, np.nan)], [(1, 2, np.inf)], [(1, 3, 2.0**53)],
    [(1, "image", 256.0)], [(1, "image", -1.0)], [(1, "image", np.nan)],
    [(3, 1, 0.5), (5, "image", 300.0)],  # one batch: its images are checked before its masks
    [(5, 1, 0.5), (3, "image", 300.0)],
    [(3, 1, 0.5), (40, "image", 300.0)],  # a later batch's image: the mask comes first
    [(40, 1, 0.5), (3, "image", 300.0)],
]


@pytest.mark.parametrize("edits", BAD_BLOCKS, ids=[str(e) for e in BAD_BLOCKS])
def test_block_path_refuses_what_tile_by_tile_refuses_with_the_same_message(tmp_path, edits):
    images, masks = blank(48)
    draw(masks, 1, 0, 1, slice(0, 20), slice(0, 20))
    for tile, where, value in edits:
        if where == "image":
            images[tile, 3, 4, 2] = value
        else:
            masks[tile, 9, 9, where] = value
    write_fold(tmp_path, 1, images, masks)
    arrays = open_fold(discover_pannuke(tmp_path)[0])
    with pytest.raises(InputFormatError) as want:
        _tile_by_tile(arrays, 0, 48)
    with pytest.raises(InputFormatError) as got:
        _by_block(arrays, 0, 48)
    assert str(got.value) == str(want.value)
    assert f"tile {min(t for t, *_ in edits) if len(edits) == 1 else ''}" in str(got.value)


def test_block_path_is_what_ingest_runs(tmp_path):
    _hand_made_block(tmp_path)
    (plan,) = pn.plan_units(tmp_path)
    (part,) = plan.parts
    assert part.convert is not None
    arrays = open_fold(discover_pannuke(tmp_path)[0])
    from cellcurate.datasets.taxonomy import Taxonomy
    from cellcurate.datasets.workers import convert_part

    images, report = convert_part(part, source="pannuke", taxonomy=Taxonomy.default())
    xs, rx, bx = _tile_by_tile(arrays, 0, 7)
    _assert_same_conversion((xs, rx, bx), (images, report, report.blocks))
