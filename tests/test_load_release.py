"""`cellcurate.datasets.load_release`: the torch Dataset over a release, and the 5-line script."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cellcurate.errors import ConfigError, InputNotFoundError
from test_release_export import add_round, build_test_store


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from cellcurate.curation.release import export_release

    root = tmp_path_factory.mktemp("rel")
    store = build_test_store(root / "store")
    add_round(store, flag_unreviewed=False)
    res = export_release(store, "v1", out=root / "releases", progress=False)
    store.close()
    return res.path


def test_items_and_tables(release):
    from cellcurate.datasets import load_release

    ds = load_release(release, split="train")
    assert ds.splits == ("fold1", "fold2", "train")
    assert len(ds) == 4 and set(ds.images["split"]) == {"fold1", "train"}
    assert set(ds.nuclei["image_id"]) <= set(ds.images["image_id"])
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 48, 48)
    assert item["instances"].dtype == torch.int32 and item["instances"].shape == (48, 48)
    assert item["classes"].dtype == torch.uint8
    assert isinstance(item["image_id"], str) and item["mpp"] == pytest.approx(0.25)
    native = ds[len(ds) - 1]
    assert native["image"].shape == (3, 40, 56) and native["mpp"] == pytest.approx(0.2505)
    # class map agrees with the nuclei table
    nuc = ds.nuclei[ds.nuclei["image_id"] == item["image_id"]]
    ins, cls = item["instances"].numpy(), item["classes"].numpy()
    for r in nuc.itertuples():
        assert set(np.unique(cls[ins == r.instance_id])) == {r.class_value}
    assert len(load_release(release, split="test")) == 2
    assert len(load_release(release, split=["val", "fold3"])) == 2
    assert len(load_release(release, split="all")) == 7
    assert ds.class_names[2] == "Lymphocyte"


def to_float(item):
    return {**item, "image": item["image"].float() / 255}


def test_transform_and_pickle(release):
    from cellcurate.datasets import load_release

    ds = load_release(release, split="fold1", transform=to_float)
    _ = ds[0]  # opens the zarr arrays
    again = pickle.loads(pickle.dumps(ds))
    assert again._arrays == {} and again[0]["image"].dtype == torch.float32
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataloader_two_workers(release):
    from torch.utils.data import DataLoader

    from cellcurate.datasets import load_release

    ds = load_release(release, split="fold1")
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert len(batches) == 1 and batches[0]["image"].shape == (2, 3, 48, 48)
    ids = [i for b in DataLoader(load_release(release, split="all"), batch_size=1, num_workers=2) for i in b["image_id"]]
    assert sorted(ids) == sorted(load_release(release, split="all").images["image_id"])


@pytest.mark.parametrize("split, err", [("bogus", ConfigError), ("fold7", ConfigError)])
def test_bad_split(release, split, err):
    from cellcurate.datasets import load_release

    with pytest.raises(err, match="unknown split"):
        load_release(release, split=split)


def test_not_a_release(tmp_path):
    from cellcurate.datasets import load_release

    with pytest.raises(InputNotFoundError, match="no manifest.json"):
        load_release(tmp_path)


@pytest.mark.slow
def test_five_line_script_from_the_docs(release, tmp_path):
    """The downstream script documented in docs/RELEASE_FORMAT.md, run as a user would."""
    script = textwrap.dedent(f"""\
        from torch.utils.data import DataLoader
        from cellcurate.datasets import load_release
        ds = load_release({str(release)!r}, split="train")
        for batch in DataLoader(ds, batch_size=1, num_workers=2):
            print(batch["image_id"][0], tuple(batch["image"].shape), len(ds.nuclei))
        """)
    assert len(script.strip().splitlines()) == 5
    (tmp_path / "train.py").write_text(script)
    out = subprocess.run([sys.executable, str(tmp_path / "train.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) == 4


def test_plain_pyarrow_zarr_reading(release):
    """What docs/RELEASE_FORMAT.md promises to readers without cellcurate."""
    import json

    import pyarrow.parquet as pq
    import zarr

    manifest = json.loads((release / "manifest.json").read_text())
    images = pq.read_table(release / "images.parquet").to_pandas()
    row = images[images["split"] == "fold1"].iloc[0]
    group = zarr.open_group(str(release / "arrays.zarr"), mode="r")[row["zarr_group"]]
    image = group["image"][row["zarr_index"]]
    classes = group["classes"][row["zarr_index"]]
    assert image.shape == (48, 48, 3) and classes.max() <= 255
    assert set(manifest["taxonomy"]["classes"]) == {str(i) for i in range(1, 8)}
