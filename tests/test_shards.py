"""cellcurate.datasets.shards: the stacked arrays' shard files written without zarr's write path
are byte for byte what zarr writes, and read back with zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from cellcurate.datasets.shards import assemble_shard, shard_layout, write_shard
from cellcurate.datasets.store import IMAGES_BLOSC, INSTANCES_BLOSC


def _arrays(root: Path, n: int, per: int, compressors: tuple[list, list] | None = None):
    g = zarr.open_group(str(root), mode="w", zarr_format=3)
    ci, cn = compressors or ([BloscCodec(**IMAGES_BLOSC)], [BloscCodec(**INSTANCES_BLOSC)])
    img = g.create_array("images", shape=(n, 16, 12, 3), dtype="uint8", chunks=(1, 16, 12, 3),
                         shards=(per, 16, 12, 3), compressors=ci, fill_value=0)
    ins = g.create_array("instances", shape=(n, 16, 12), dtype="int32", chunks=(1, 16, 12),
                         shards=(per, 16, 12), compressors=cn, fill_value=0)
    return img, ins


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "/c/" in p.relative_to(root).as_posix()}


@pytest.mark.parametrize("n,per", [(10, 4), (8, 4), (3, 3), (1, 1)])
def test_shards_are_the_bytes_zarr_writes(tmp_path, n, per):
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, 16, 12, 3)).astype(np.uint8)
    images[images < 40] = 0
    instances = np.zeros((n, 16, 12), np.int32)
    for t in range(n):
        instances[t, t % 16, :5] = t + 1
    if n > 2:
        instances[1] = 0  # an empty chunk inside a shard
        images[2] = 0
    if n >= 8:
        instances[4:8] = 0  # a whole empty shard of instance maps: no file at all
    zimg, zins = _arrays(tmp_path / "zarr", n, per)
    for s in range(0, n, per):
        zimg[s : s + per] = images[s : s + per]
        zins[s : s + per] = instances[s : s + per]
    ours = tmp_path / "ours"
    oimg, oins = _arrays(ours, n, per)
    layouts = shard_layout(oimg, ours / "images"), shard_layout(oins, ours / "instances")
    assert None not in layouts
    for layout, data in zip(layouts, (images, instances)):
        assert layout is not None
        for k, s in enumerate(range(0, n, per)):
            write_shard(layout, k, [layout.codec.encode(t) for t in data[s : s + per]])
    assert _files(ours) == _files(tmp_path / "zarr") and _files(ours)
    back = zarr.open_group(str(ours), mode="r")
    assert np.array_equal(back["images"][:], images) and np.array_equal(back["instances"][:], instances)


def test_other_layouts_are_left_to_zarr(tmp_path):
    img, ins = _arrays(tmp_path / "a", 4, 2, ([BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
                                              [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]))
    lay = shard_layout(img, tmp_path / "a" / "images")
    assert lay is not None and lay.codec.cname == "lz4"  # another blosc setting is still the same layout
    g = zarr.open_group(str(tmp_path / "b"), mode="w", zarr_format=3)
    plain = g.create_array("x", shape=(4, 8), dtype="int32", chunks=(1, 8), fill_value=0)  # not sharded
    assert shard_layout(plain, tmp_path / "b" / "x") is None
    gz = g.create_array("y", shape=(4, 8), dtype="int32", chunks=(1, 8), shards=(2, 8),
                        compressors=[zarr.codecs.GzipCodec()], fill_value=0)
    assert shard_layout(gz, tmp_path / "b" / "y") is None
    filled = g.create_array("z", shape=(4, 8), dtype="int32", chunks=(1, 8), shards=(2, 8), fill_value=7)
    assert shard_layout(filled, tmp_path / "b" / "z") is None
    with pytest.raises(ValueError, match="5 chunks for a shard of 4"):
        assemble_shard([b"x"] * 5, 4)
    assert assemble_shard([None, None], 4) is None


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_ingested_fold_has_the_shard_files_zarr_would_write(tmp_path, tiny_sample, monkeypatch, jobs):
    from cellcurate.datasets import pannuke, store
    from cellcurate.datasets.ingest import ingest_pannuke
    from cellcurate.datasets.store import Store

    monkeypatch.setattr(store, "TILES_PER_SHARD", 4)  # 6-tile folds: a full and a partial shard
    monkeypatch.setattr(pannuke, "PART_TILES", 4)
    with Store.create(tmp_path / "store") as s:
        ingest_pannuke(s, tiny_sample.pannuke_root, progress=False, jobs=jobs)
        dirs = list(s.units()["dir"])
    assert dirs
    for d in dirs:
        ours = tmp_path / "store" / d / "arrays.zarr"
        src = zarr.open_group(str(ours), mode="r")
        again = zarr.open_group(str(tmp_path / "again" / d), mode="w", zarr_format=3)
        for name in ("images", "instances"):
            a = src[name]
            b = again.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.chunks, shards=a.shards,
                                   compressors=a.compressors, fill_value=0)
            b[...] = a[...]
        assert _files(ours) == _files(tmp_path / "again" / d) and len(_files(ours)) >= 2


@pytest.mark.parametrize("jobs", [1, 2])
def test_every_file_and_folder_of_a_stacked_unit_is_fsynced_once_before_its_rename(
        tmp_path, tiny_sample, monkeypatch, jobs):
    """The shard files and their folders are fsynced by the writer thread as it writes them
    (``write_shard(synced=)``), the rest by the unit's ``fsync_tree``, which skips the former:
    each path of the unit folder exactly once, all before the folder is renamed into place."""
    import os
    from collections import Counter

    from cellcurate.datasets import pannuke, store
    from cellcurate.datasets.ingest import ingest_pannuke
    from cellcurate.datasets.store import Store

    monkeypatch.setattr(store, "TILES_PER_SHARD", 4)
    monkeypatch.setattr(pannuke, "PART_TILES", 4)
    seen: dict[str, Counter[str]] = {}  # unit folder (temporary name) -> fsyncs of the paths in it
    renamed: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def unit_root(path: str) -> str | None:
        head, sep, rest = path.partition("/units/.tmp-pannuke")
        return head + sep + rest.split("/")[0] if sep else None

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        root = unit_root(path)
        if root is not None:
            assert root not in renamed, f"{path} fsynced after its unit folder was renamed"
            seen.setdefault(root, Counter())[os.path.normpath(path)] += 1
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        src = os.fspath(src)
        if os.path.basename(src).startswith(".tmp-pannuke"):
            root = os.path.normpath(src)
            renamed.append(root)
            tree = {os.path.normpath(os.path.join(d, n)) for d, ds, fs in os.walk(src) for n in [*ds, *fs]}
            tree.add(root)
            synced = Counter({p: c for p, c in seen.get(root, Counter()).items()
                              if not os.path.basename(p).endswith(".tmp")})  # atomic writes' temporaries
            assert tree == set(synced), (sorted(tree - set(synced))[:5], sorted(set(synced) - tree)[:5])
            twice = [p for p, c in synced.items() if c > 1 and p != root]  # root: also by report.json's write
            assert not twice, twice[:5]
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with Store.create(tmp_path / "store") as s:
        ingest_pannuke(s, tiny_sample.pannuke_root, progress=False, jobs=jobs)
    assert renamed  # every PanNuke unit went through the check


def test_a_layout_it_does_not_know_is_written_by_zarr(tmp_path, tiny_sample, monkeypatch):
    from store_readback import assert_same_content

    from cellcurate.datasets import pannuke, shards
    from cellcurate.datasets.ingest import ingest_pannuke
    from cellcurate.datasets.store import Store

    monkeypatch.setattr(pannuke, "PART_TILES", 4)
    with Store.create(tmp_path / "a") as s:
        ingest_pannuke(s, tiny_sample.pannuke_root, progress=False, jobs=2)
    monkeypatch.setattr(shards, "shard_layout", lambda array, folder: None)
    with Store.create(tmp_path / "b") as s:
        ingest_pannuke(s, tiny_sample.pannuke_root, progress=False, jobs=2)  # tiles come back as arrays
    assert_same_content(tmp_path / "a", tmp_path / "b")  # file bytes included


# -- native-size images (MoNuSAC): one shard per image, compressed in the ingest workers ----------
def _native_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("h,w", [(600, 1200), (1200, 1200), (512, 512), (300, 77), (1030, 1540), (1600, 513)])
def test_native_shard_files_are_the_bytes_zarr_writes(tmp_path, h, w):
    from cellcurate.datasets.shards import native_shard, write_file
    from cellcurate.datasets.store import _chunk_codecs, native_chunks

    rng = np.random.default_rng(h + w)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    image[: h // 3, : w // 4] = 0  # whole chunks of fill value inside the shard (left out)
    instances = np.zeros((h, w), np.int32)
    instances[h - 5 :, w - 9 :] = 7  # only the bottom-right (edge) chunk holds anything
    if h == 512:
        instances[:] = 0  # every chunk empty: no file
    chunks, shards = native_chunks(h, w)
    img_codec, ins_codec = _chunk_codecs()
    for root, ours in ((tmp_path / "zarr", False), (tmp_path / "ours", True)):
        g = zarr.open_group(str(root), mode="w", zarr_format=3)
        for arr, data, chunk, shard, comp, codec in (
                ("img/0", image, (*chunks, 3), (*shards, 3), IMAGES_BLOSC, img_codec),
                ("ins/0", instances, chunks, shards, INSTANCES_BLOSC, ins_codec)):
            if not ours:
                g.create_array(arr, data=data, chunks=chunk, shards=shard, compressors=[BloscCodec(**comp)],
                               fill_value=0)
                continue
            a = g.create_array(arr, shape=data.shape, dtype=data.dtype, chunks=chunk, shards=shard,
                               compressors=[BloscCodec(**comp)], fill_value=0)
            layout = shard_layout(a, root / arr, native=True)
            assert layout is not None and layout.chunk == chunk
            write_file(layout.path(0), native_shard(data, chunk, codec))
    assert _native_files(tmp_path / "ours") == _native_files(tmp_path / "zarr")
    assert ("ins/0/c/0/0" in _native_files(tmp_path / "ours")) == (h != 512)
    back = zarr.open_group(str(tmp_path / "ours"), mode="r")
    np.testing.assert_array_equal(back["img/0"][...], image)
    np.testing.assert_array_equal(back["ins/0"][...], instances)


def test_native_layout_refuses_arrays_of_several_shards(tmp_path):
    g = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    two = g.create_array("x", shape=(600, 600), dtype="int32", chunks=(100, 100), shards=(300, 600),
                         compressors=[BloscCodec(**INSTANCES_BLOSC)], fill_value=0)
    assert shard_layout(two, tmp_path / "x", native=True) is None
    one = g.create_array("y", shape=(600, 600), dtype="int32", chunks=(100, 100), shards=(600, 600),
                         compressors=[BloscCodec(**INSTANCES_BLOSC)], fill_value=0)
    assert shard_layout(one, tmp_path / "y", native=True) is not None
    assert shard_layout(one, tmp_path / "y") is None  # not a stacked array


def test_native_images_compressed_in_workers_are_the_store_the_writer_makes(tmp_path, tiny_sample):
    from store_readback import assert_same_content

    from cellcurate.datasets.ingest import ingest_monusac
    from cellcurate.datasets.store import Store

    for name, jobs in (("a", 1), ("b", 2)):
        with Store.create(tmp_path / name) as s:
            ingest_monusac(s, tiny_sample.monusac_root, progress=False, jobs=jobs)
    assert_same_content(tmp_path / "a", tmp_path / "b")  # file bytes included
