"""cellcurate.datasets.shards: the stacked arrays' shard files written without zarr's write path
are byte for byte what zarr writes, and read back with zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from cellcurate.datasets.shards import assemble_shard, read_tile, shard_layout, write_shard
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


def _zarr_written(root: Path, n: int, per: int):
    """Stacked arrays written by zarr itself: a full shard, a partial last one, empty tiles inside a
    shard and (instances, n >= 8) a whole shard with no file."""
    rng = np.random.default_rng(n + per)
    images = rng.integers(1, 256, (n, 16, 12, 3)).astype(np.uint8)
    instances = np.zeros((n, 16, 12), np.int32)
    for t in range(n):
        instances[t, t % 16, : 1 + t % 12] = 70_000 * (t + 1)  # ids past 16 bits: all four bytes matter
    if n > 2:
        images[1] = 0
        instances[2] = 0
    if n >= 8:
        instances[4:8] = 0
    zimg, zins = _arrays(root, n, per)
    zimg[...] = images
    zins[...] = instances
    return zimg, zins, images, instances


@pytest.mark.parametrize("n,per", [(10, 4), (8, 4), (3, 3), (1, 1)])
def test_read_tile_reads_what_zarr_reads(tmp_path, n, per):
    zimg, zins, images, instances = _zarr_written(tmp_path, n, per)
    assert not (tmp_path / "instances" / "c" / "1").exists() or n < 8  # the empty shard has no file
    for arr, name, data in ((zimg, "images", images), (zins, "instances", instances)):
        layout = shard_layout(arr, tmp_path / name)
        assert layout is not None
        for t in range(n):
            got = read_tile(layout, t, data.shape[1:], data.dtype)
            assert got.dtype == data.dtype and got.flags.c_contiguous and got.flags.writeable
            assert np.array_equal(got, arr[t]) and np.array_equal(got, data[t])


def _damaged(tmp_path: Path, change) -> tuple:
    zimg, _zins, images, _ = _zarr_written(tmp_path, 4, 4)
    layout = shard_layout(zimg, tmp_path / "images")
    assert layout is not None
    f = layout.path(0)
    data = bytearray(f.read_bytes())
    f.write_bytes(bytes(change(data)))
    return layout, f, images


def _flip(data: bytearray, at: int) -> bytearray:
    data[at] ^= 0xFF
    return data


def _entry(data: bytearray, j: int, offset: int, nbytes: int) -> bytearray:
    """Point index entry ``j`` at (offset, nbytes), with a CRC32C that still matches."""
    import google_crc32c

    n_index = 16 * 4
    start = len(data) - n_index - 4
    index = bytearray(data[start : start + n_index])
    index[16 * j : 16 * j + 16] = np.array([offset, nbytes], "<u8").tobytes()
    return data[:start] + index + np.array([google_crc32c.value(bytes(index))], "<u4").tobytes()


@pytest.mark.parametrize("change,message", [
    (lambda d: d[:40], r"shard file truncated \(40 bytes, the index alone is 68\)"),
    (lambda d: _flip(d, len(d) - 10), "shard index fails its CRC32C"),
    (lambda d: _entry(d, 3, 10**9, 500), r"chunk 3 of the shard runs outside the file \(offset 1000000000"),
    (lambda d: _entry(d, 3, 0, 20), "chunk 3 of the shard does not decode"),
])
def test_a_damaged_shard_is_one_line_naming_its_file(tmp_path, change, message):
    from cellcurate.errors import StoreError

    layout, f, images = _damaged(tmp_path, change)
    with pytest.raises(StoreError, match=message) as err:
        read_tile(layout, 3, images.shape[1:], images.dtype)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_a_chunk_of_another_size_is_refused(tmp_path):
    """A chunk whose blosc header promises more bytes than a tile (a crafted file, or a tile of
    another array) is refused before anything is decoded into the tile."""
    from cellcurate.errors import StoreError

    zimg, zins, images, instances = _zarr_written(tmp_path, 4, 4)
    img_layout = shard_layout(zimg, tmp_path / "images")
    ins_layout = shard_layout(zins, tmp_path / "instances")
    assert img_layout is not None and ins_layout is not None
    # an instance tile (16*12*4 = 768 bytes) where an image tile (576 bytes) belongs
    img_layout.path(0).write_bytes(ins_layout.path(0).read_bytes())
    with pytest.raises(StoreError, match=r"chunk 0 of the shard does not decode \(holds 768 bytes, a chunk is 576\)"):
        read_tile(img_layout, 0, images.shape[1:], images.dtype)


def test_a_removed_array_is_not_read_as_zeros(tmp_path):
    import shutil

    from cellcurate.errors import StoreError

    zimg, _zins, images, _ = _zarr_written(tmp_path, 4, 4)
    layout = shard_layout(zimg, tmp_path / "images")
    assert layout is not None
    shutil.rmtree(tmp_path / "images")
    with pytest.raises(StoreError, match="the array is gone"):
        read_tile(layout, 0, images.shape[1:], images.dtype)


def test_store_reads_stacked_tiles_directly_and_as_zarr_does(tiny_store_path, monkeypatch):
    """Store.read of a stacked tile goes through read_tile (not zarr's indexing), and gives zarr's
    arrays, whole and as windows."""
    from cellcurate.datasets import shards
    from cellcurate.datasets.store import Store

    calls: list[int] = []
    real = shards.read_tile

    def counting(layout, idx, shape, dtype):
        calls.append(idx)
        return real(layout, idx, shape, dtype)

    monkeypatch.setattr("cellcurate.datasets.store.read_tile", counting)
    with Store.open(tiny_store_path) as s:
        ids = [i for i in s.images()["image_id"] if s._image_row(i)[2] >= 0][:12]  # stacked tiles
        assert ids
        for image_id in ids:
            row = s._image_row(image_id)
            zimg = zarr.open_array(str(tiny_store_path / s.ledger.unit(row[0])["dir"] / "arrays.zarr" / "images"), mode="r")
            zins = zarr.open_array(str(tiny_store_path / s.ledger.unit(row[0])["dir"] / "arrays.zarr" / "instances"), mode="r")
            img, ins = s.read(image_id)
            assert np.array_equal(img, zimg[row[2]]) and np.array_equal(ins, zins[row[2]])
            wimg, wins = s.read_region(image_id, 5, 7, 40, 300)
            assert np.array_equal(wimg, zimg[row[2], 5:40, 7:]) and np.array_equal(wins, zins[row[2], 5:40, 7:])
        assert len(calls) == 4 * len(ids)


def test_store_read_of_a_damaged_shard_names_the_file(tiny_store_path, tmp_path):
    import shutil

    from cellcurate.datasets.store import Store
    from cellcurate.errors import StoreError

    copy = tmp_path / "store"
    shutil.copytree(tiny_store_path, copy)
    with Store.open(copy) as s:
        image_id = next(i for i in s.images()["image_id"] if s._image_row(i)[2] >= 0)
        unit, _path, idx = s._image_row(image_id)[:3]
        layout = s._opened(unit, "instances")[1]
        assert layout is not None
        shard = layout.path(idx // layout.tiles_per_shard)
        assert shard.is_file() and copy in shard.parents
        data = bytearray(shard.read_bytes())
        data[-6] ^= 0xFF
        shard.write_bytes(bytes(data))
        with pytest.raises(StoreError, match="shard index fails its CRC32C") as err:
            s.read_instances(image_id)
        assert str(shard) in str(err.value)
        assert s.read_image(image_id).any()  # the other array is untouched


@pytest.mark.parametrize("h,w", [(600, 1200), (300, 77), (1030, 1540), (512, 512)])
def test_read_native_reads_what_zarr_reads_whole_and_in_windows(tmp_path, h, w):
    """Arrays written by zarr itself in the native layout: edge chunks, chunks left out as empty,
    (512 x 512 instances) no file at all; windows inside one chunk, across chunk edges, at the
    array's edge, empty."""
    from cellcurate.datasets.shards import read_native
    from cellcurate.datasets.store import native_chunks

    rng = np.random.default_rng(h * w)
    image = rng.integers(1, 256, (h, w, 3)).astype(np.uint8)
    image[: h // 3, : w // 4] = 0
    instances = np.zeros((h, w), np.int32)
    instances[h // 2 :, w // 3 :] = rng.integers(0, 90_000, (h - h // 2, w - w // 3))
    if h == 512:
        instances[:] = 0
    chunks, shards = native_chunks(h, w)
    g = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    zimg = g.create_array("img/0", data=image, chunks=(*chunks, 3), shards=(*shards, 3),
                          compressors=[BloscCodec(**IMAGES_BLOSC)], fill_value=0)
    zins = g.create_array("ins/0", data=instances, chunks=chunks, shards=shards,
                          compressors=[BloscCodec(**INSTANCES_BLOSC)], fill_value=0)
    assert (tmp_path / "ins/0/c/0/0").exists() == (h != 512)
    windows = [None, (slice(0, h), slice(0, w)), (slice(3, 9), slice(4, 11)),
               (slice(h // 3 - 5, h - 1), slice(w // 4 - 3, w)), (slice(h - 2, h), slice(0, 1)),
               (slice(7, 7), slice(0, w))]
    for name, z, data in (("img/0", zimg, image), ("ins/0", zins, instances)):
        layout = shard_layout(z, tmp_path / name, native=True)
        assert layout is not None
        for win in windows:
            got = read_native(layout, data.shape, data.dtype, win)
            want = data if win is None else data[win]
            assert got.shape == want.shape and got.dtype == data.dtype
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(got, z[...] if win is None else z[win])


def test_store_reads_native_images_directly(tiny_store_path, monkeypatch):
    """Store.read / read_region of a native-size (MoNuSAC) image go through read_native and give
    zarr's arrays."""
    from cellcurate.datasets import shards
    from cellcurate.datasets.store import Store

    calls: list[object] = []
    real = shards.read_native

    def counting(layout, shape, dtype, window=None):
        calls.append(window)
        return real(layout, shape, dtype, window)

    monkeypatch.setattr("cellcurate.datasets.store.read_native", counting)
    with Store.open(tiny_store_path) as s:
        ids = [i for i in s.images()["image_id"] if s._image_row(i)[2] < 0][:6]
        assert ids
        for image_id in ids:
            unit, path, _idx, h, w = s._image_row(image_id)
            base = tiny_store_path / s.ledger.unit(unit)["dir"] / "arrays.zarr"
            zimg = zarr.open_array(str(base / path), mode="r")
            zins = zarr.open_array(str(base / path.replace("img/", "ins/", 1)), mode="r")
            img, ins = s.read(image_id)
            np.testing.assert_array_equal(img, zimg[...])
            np.testing.assert_array_equal(ins, zins[...])
            wimg, wins = s.read_region(image_id, h // 3, -20, h + 50, w // 2)
            np.testing.assert_array_equal(wimg, zimg[h // 3 :, : w // 2])
            np.testing.assert_array_equal(wins, zins[h // 3 :, : w // 2])
        assert len(calls) == 4 * len(ids)
