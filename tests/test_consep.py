"""CoNSeP reader: the real fixture patches (4-class merge) and the release layout (7 classes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from store_readback import arrays, assert_pixels_equal_source, snapshot, tables

from cellcurate.datasets.ingest import ingest_source
from cellcurate.datasets.store import Store
from cellcurate.errors import InputFormatError

MERGED = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}


@pytest.fixture(scope="module")
def consep_store(fixtures_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("consep") / "store"
    with Store.create(path) as store:
        ingest_source(store, "consep", fixtures_dir / "real" / "consep", progress=False)
    return path


def test_counts_per_class_equal_the_type_files(consep_store, fixtures_dir):
    import scipy.io

    root = fixtures_dir / "real" / "consep"
    expect: dict[str, int] = {}
    for mat in sorted((root / "type_mat").glob("*.mat")):
        for t in scipy.io.loadmat(mat)["inst_type"].ravel():
            expect[MERGED[int(t)]] = expect.get(MERGED[int(t)], 0) + 1
    images, nuclei = tables(consep_store)
    assert len(images) == 16
    assert nuclei["source_label"].value_counts().to_dict() == expect
    assert sum(expect.values()) == len(nuclei) == 1006


def test_every_instance_has_the_source_pixels_and_the_class_png_agrees(consep_store, fixtures_dir):
    from PIL import Image

    root = fixtures_dir / "real" / "consep"
    images, nuclei = tables(consep_store)
    by_name = {v: k for k, v in MERGED.items()}
    for _, row in images.iterrows():
        stem = Path(row["origin_file"]).stem
        image, ins = arrays(consep_store, row)
        nuc = nuclei[nuclei["image_id"] == row["image_id"]]
        source = np.load(root / "inst" / f"{stem}.npy")
        assert_pixels_equal_source(ins, nuc, source)
        seg = np.asarray(Image.open(root / "seg_mask" / f"{stem}.png"))
        cls = np.zeros(len(nuc) + 1, np.uint8)
        cls[nuc["instance_id"].to_numpy()] = [by_name[s] for s in nuc["source_label"]]
        np.testing.assert_array_equal(cls[ins], seg)
        np.testing.assert_array_equal(image, np.asarray(Image.open(root / "images" / f"{stem}.jpg").convert("RGB")))
    assert set(images["mpp"]) == {0.25} and set(images["split"]) == {"test"}
    assert images["image_id"].iloc[0] == "consep/test_1/000"


def test_reingest_is_a_noop_with_the_same_ids(consep_store, fixtures_dir, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(consep_store, path)
    before = tables(path)[1]["nucleus_id"].tolist()
    with Store.open(path, mode="a") as store:
        result = ingest_source(store, "consep", fixtures_dir / "real" / "consep", progress=False)
    assert [u.status for u in result.units] == ["unchanged"]
    assert tables(path)[1]["nucleus_id"].tolist() == before


# -- the release layout, built in the real .mat format ----------------------------------------
def _write_release(root: Path, *, inst: np.ndarray | None = None, types: list[int] | None = None,
                   image_shape: tuple[int, int] = (40, 50), drop: str | None = None) -> Path:
    import scipy.io
    from PIL import Image

    inst = inst if inst is not None else _inst()
    types = types if types is not None else [1, 3, 4, 7]
    for split in ("Train", "Test"):
        (root / split / "Images").mkdir(parents=True, exist_ok=True)
        (root / split / "Labels").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        rgba = rng.integers(0, 256, (*image_shape, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(root / split / "Images" / f"{split.lower()}_1.png")
        type_map = np.zeros(inst.shape, np.int32)
        for i, t in enumerate(types, start=1):
            type_map[inst == i] = t
        data = {"inst_map": inst.astype(np.float64), "type_map": type_map,
                "inst_type": np.array(types, np.float64)[:, None],
                "inst_centroid": np.zeros((len(types), 2))}
        if drop:
            data.pop(drop)
        scipy.io.savemat(root / split / "Labels" / f"{split.lower()}_1.mat", data)
    return root


def _inst() -> np.ndarray:
    inst = np.zeros((40, 50), np.int32)
    inst[2:6, 3:8] = 1  # 20 px
    inst[10:13, 10:20] = 2  # 30 px
    inst[20:22, 30:33] = 3  # 6 px
    inst[30:35, 40:45] = 4  # 25 px
    inst[36:38, 0:2] = 4  # a second piece of 4
    return inst


def test_release_layout_original_seven_classes(tmp_path):
    root = _write_release(tmp_path / "CoNSeP")
    with Store.create(tmp_path / "store") as store:
        result = ingest_source(store, "consep", tmp_path, progress=False)  # finds the CoNSeP folder
        cur = store.nuclei()
    assert sorted(u.unit for u in result.units) == ["consep-test", "consep-train"]
    assert result.report.counts["instances_in_pieces"] == 2 and result.report.counts["type_map_disagreement_pixels"] == 0
    images, nuclei = tables(tmp_path / "store")
    assert sorted(images["split"]) == ["test", "train"]
    train = nuclei[nuclei["image_id"] == "consep/train_1"].sort_values("instance_id")
    assert train["source_label"].tolist() == ["other", "healthy epithelial", "dysplastic/malignant epithelial",
                                              "endothelial"]
    assert train["area"].tolist() == [20, 30, 6, 29]
    _, ins = arrays(tmp_path / "store", images[images["image_id"] == "consep/train_1"].iloc[0])
    assert_pixels_equal_source(ins, train, _inst())
    # the default taxonomy: "other" -> all 7, healthy epithelial -> Epithelial (5), endothelial -> Connective (3)
    c = cur[cur["image_id"] == "consep/train_1"].sort_values("instance_id")["candidates"].tolist()
    assert c == ["1|2|3|4|5|6|7", "5", "1", "3"]
    assert root.is_dir()


def test_release_layout_merged_on_request(tmp_path):
    _write_release(tmp_path / "CoNSeP")
    with Store.create(tmp_path / "store") as store:
        ingest_source(store, "consep", tmp_path / "CoNSeP", classes="merged", progress=False)
    _, nuclei = tables(tmp_path / "store")
    train = nuclei[nuclei["image_id"] == "consep/train_1"].sort_values("instance_id")
    assert train["source_label"].tolist() == ["other", "epithelial", "epithelial", "spindle-shaped"]


@pytest.mark.parametrize("case, message", [
    ("truncated", "not a readable .mat file"),
    ("no_inst_map", "has no inst_map"),
    ("size", "labels are 50x40 but the image train_1.png is 60x30"),
    ("rows", "inst_type has 3 rows"),
])
def test_bad_release_files_give_one_line_and_leave_the_store_unchanged(tmp_path, fixtures_dir, case, message):
    store_path = tmp_path / "store"
    with Store.create(store_path) as store:
        ingest_source(store, "consep", fixtures_dir / "real" / "consep", progress=False)
    before = snapshot(store_path)
    kwargs = {"no_inst_map": {"drop": "inst_map"}, "size": {"image_shape": (30, 60)},
              "rows": {"types": [1, 2, 3]}}.get(case, {})
    if case == "rows":
        inst = _inst()
        kwargs["inst"] = inst
    root = _write_release(tmp_path / "CoNSeP", **kwargs)
    bad = root / "Train" / "Labels" / "train_1.mat"
    if case == "truncated":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    with Store.open(store_path, mode="a") as store, pytest.raises(InputFormatError) as err:
        ingest_source(store, "consep", root, progress=False)
    text = str(err.value)
    assert "\n" not in text and message in text and "train_1" in text
    assert snapshot(store_path) == before


@pytest.mark.slow
def test_cli_bad_mat_is_one_line_and_exit_1(tmp_path):
    import subprocess
    import sys

    root = _write_release(tmp_path / "CoNSeP", drop="inst_map")
    r = subprocess.run([sys.executable, "-m", "cellcurate.cli.main", "ingest", "consep", str(root),
                        "--store", str(tmp_path / "store")], capture_output=True, text=True, check=False)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train_1.mat: has no inst_map" in lines[0]


def test_demo_real_sample_is_small_licensed_and_ingests(tmp_path):
    import scipy.io

    from cellcurate.cli.demo import real_sample_path

    root = real_sample_path()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 2 * 1024 * 1024
    readme = (root / "README.md").read_text()
    assert "CC BY-NC-SA 4.0" in readme and "RessCris2/pannuke_app @ 2b35a852" in readme
    expect = sum(scipy.io.loadmat(m)["inst_type"].size for m in (root / "type_mat").glob("*.mat"))
    with Store.create(tmp_path / "store") as store:
        result = ingest_source(store, "consep", root, progress=False)
    assert result.units[0].n_images == 4 and result.units[0].n_nuclei == expect == 304
