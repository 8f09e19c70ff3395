import numpy as np
import pandas as pd
import pytest

from cellcurate.datasets.records import SourceImage
from cellcurate.datasets.store import Store, instance_geometry, nucleus_id
from cellcurate.errors import StoreError


def make_item(i, labels, *, size=64, source_file="Fold 1/images/fold1/images.npy"):
    """An image with one 4x4 square per label, at known places."""
    img = np.full((size, size, 3), 200, np.uint8)
    ins = np.zeros((size, size), np.int32)
    for k in range(len(labels)):
        y, x = 4 + 8 * k, 10
        ins[y : y + 4, x : x + 4] = k + 1
        img[y : y + 4, x : x + 4] = (60, 40, 120)
    n = len(labels)
    nuc = pd.DataFrame({
        "instance_id": np.arange(1, n + 1, dtype=np.int32), "kind": "nucleus", "source_label": labels,
        "origin_channel": np.zeros(n, np.int16), "origin_instance": np.arange(n) + 100, "origin_region": "",
    })
    return SourceImage(key=f"fold1/{i:05d}", split="fold1", image=img, instances=ins, nuclei=nuc,
                       origin_file=source_file, origin_index=i, annotation_file="Fold 1/masks/fold1/masks.npy",
                       tissue="Breast")


def write_unit(store, items, unit="pannuke-fold1", fingerprint="fp1", stacked=True):
    shape = (len(items), *items[0].instances.shape) if stacked else None
    with store.unit_writer(unit, "pannuke", fingerprint=fingerprint, origin="/src", stacked=shape) as w:
        for it in items:
            w.add(it)
        return w.commit()


def test_instance_geometry_exact():
    ins = np.zeros((6, 7), np.int32)
    ins[1:3, 2:5] = 1  # 2x3 box
    ins[5, 6] = 2
    g = instance_geometry(ins, 2)
    assert g["area"].tolist() == [6, 1]
    assert g["bbox"].tolist() == [[1, 2, 3, 5], [5, 6, 6, 7]]
    assert g["cy"].tolist() == [1.5, 5.0] and g["cx"].tolist() == [3.0, 6.0]


def test_instance_geometry_boxes_are_scipys():
    """The bbox without scipy is find_objects' bbox: scattered, split and absent instances, ids above n."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for trial in range(30):
        h, w = rng.integers(1, 40, 2)
        n = int(rng.integers(0, 12))
        ins = rng.integers(0, n + 3, (h, w)).astype(np.int32) * (rng.random((h, w)) < 0.3)
        g = instance_geometry(ins, n)
        want = np.zeros((n, 4), np.int32)
        for i, sl in enumerate(ndimage.find_objects(ins, max_label=n) if n else []):  # 0: scipy means "all"
            if sl is not None:
                want[i] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
        assert np.array_equal(g["bbox"], want), trial
        assert g["area"].tolist() == [int((ins == i).sum()) for i in range(1, n + 1)]
    assert instance_geometry(np.zeros((3, 3), np.int32), 2)["bbox"].tolist() == [[0, 0, 0, 0]] * 2


def test_nucleus_id_is_stable_and_distinct():
    a = nucleus_id("pannuke", "Fold 1/masks/fold1/masks.npy", 3, 0, 17, "")
    assert a == nucleus_id("pannuke", "Fold 1/masks/fold1/masks.npy", 3, 0, 17, "")
    assert a != nucleus_id("pannuke", "Fold 1/masks/fold1/masks.npy", 3, 2, 17, "")  # same raw id, other channel
    assert 0 <= a < 2**63


@pytest.mark.parametrize("stacked", [True, False])
def test_write_read_roundtrip(tmp_path, stacked):
    store = Store.create(tmp_path / "s")
    items = [make_item(i, ["Neoplastic", "Inflammatory", "Dead"][: i + 1]) for i in range(3)]
    s = write_unit(store, items, stacked=stacked)
    assert (s.n_images, s.n_nuclei, s.status) == (3, 6, "ingested")
    again = Store.open(tmp_path / "s")
    for it in items:
        img, ins = again.read(f"pannuke/{it.key}")
        assert np.array_equal(img, it.image) and np.array_equal(ins, it.instances)
    nuc = again.nuclei()
    assert len(nuc) == 6 and nuc["area"].eq(16).all()
    assert nuc.loc[nuc.source_label == "Inflammatory", "candidates"].eq("2|6|7").all()
    assert nuc.loc[nuc.source_label == "Inflammatory", "unified_label"].eq(0).all()
    assert nuc.loc[nuc.source_label == "Dead", "unified_label"].eq(4).all()
    cur = again.current_labels()
    assert set(cur["status"]) == {"source", "unresolved"}
    assert again.ledger.count("ingest") == 6
    win_img, win_ins = again.read_region("pannuke/fold1/00002", 0, 0, 16, 20)
    assert win_ins.shape == (16, 20) and set(np.unique(win_ins)) == {0, 1, 2}


def test_failed_unit_leaves_store_unchanged(tmp_path):
    store = Store.create(tmp_path / "s")
    write_unit(store, [make_item(0, ["Neoplastic"])])
    before = (store.ledger.head(), sorted(p.name for p in (tmp_path / "s" / "units").iterdir()))
    bad = make_item(1, ["Neoplastic", "Mitosis"])
    with pytest.raises(StoreError, match="unknown pannuke class 'Mitosis'"):
        write_unit(store, [make_item(0, ["Dead"]), bad], unit="pannuke-fold2", fingerprint="fp2")
    after = (store.ledger.head(), sorted(p.name for p in (tmp_path / "s" / "units").iterdir()))
    assert before == after


def test_duplicate_ids_across_units_refused(tmp_path):
    store = Store.create(tmp_path / "s")
    write_unit(store, [make_item(0, ["Neoplastic"])])
    with pytest.raises(StoreError, match="already belong to other units"):
        write_unit(store, [make_item(0, ["Neoplastic"])], unit="other", fingerprint="x")
    assert store.ledger.count() == 1


def test_replace_unit_keeps_ids_and_removes_old_folder(tmp_path):
    store = Store.create(tmp_path / "s")
    write_unit(store, [make_item(0, ["Neoplastic", "Dead"])])
    ids = sorted(store.nuclei()["nucleus_id"])
    assert store.unit_status("pannuke-fold1", "fp1") == "unchanged"
    assert store.unit_status("pannuke-fold1", "fp2") == "changed"
    s = write_unit(store, [make_item(0, ["Neoplastic", "Dead"])], fingerprint="fp2")
    assert s.status == "replaced"
    assert sorted(store.nuclei()["nucleus_id"]) == ids
    assert len(list((tmp_path / "s" / "units").iterdir())) == 1
    assert store.ledger.count("ingest") == 4  # history kept: two ingest events per nucleus


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="no such store folder"):
        Store.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a cellcurate store"):
        Store.open(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="not an empty cellcurate store"):
        Store.create(tmp_path / "full")


def test_readonly_store_refuses_writes(tmp_path):
    Store.create(tmp_path / "s").close()
    ro = Store.open(tmp_path / "s", mode="r")
    with pytest.raises(StoreError, match="read-only"):
        ro.unit_writer("u", "pannuke", fingerprint="f", origin="o")


def test_orphans_are_ignored_and_removed(tmp_path):
    store = Store.create(tmp_path / "s")
    write_unit(store, [make_item(0, ["Neoplastic"])])
    (tmp_path / "s" / "units" / ".tmp-pannuke-fold2-dead").mkdir()
    assert len(Store.open(tmp_path / "s").images()) == 1
    assert store.remove_orphans() == ["units/.tmp-pannuke-fold2-dead"]


@pytest.mark.parametrize("stacked", [True, False])
def test_iter_images_matches_single_reads(tmp_path, stacked):
    store = Store.create(tmp_path / "s")
    items = [make_item(i, ["Neoplastic", "Dead"][: 1 + i % 2]) for i in range(5)]
    write_unit(store, items, stacked=stacked)
    got = {i: (im, ins) for i, im, ins in store.iter_images(batch=2)}
    assert sorted(got) == sorted(f"pannuke/{it.key}" for it in items)
    for image_id, (im, ins) in got.items():
        ref = store.read(image_id)
        assert np.array_equal(im, ref[0]) and np.array_equal(ins, ref[1])
    assert [i for i, _, _ in store.iter_images(["pannuke/fold1/00003", "pannuke/fold1/00001"])] == [
        "pannuke/fold1/00001", "pannuke/fold1/00003"]
    # the instance maps alone, in the same order and slabs
    only = list(store.iter_instances(batch=2))
    assert [i for i, _ in only] == [i for i, _, _ in store.iter_images(batch=2)]
    for image_id, ins in only:
        assert np.array_equal(ins, got[image_id][1])
