"""Release faults: links and paths that leave the release, malformed manifest entries, and the
temporary folders of killed exports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cellcurate.cli.main import cli
from cellcurate.curation.release import export_release, verify_release
from cellcurate.datasets.store import Store
from cellcurate.errors import StateError
from cellcurate.napari_plugin.sample import write_disc_store


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    store = write_disc_store(root / "store", n_images=2, per_image=4, size=128, seed=3)
    export_release(store, "v1", out=root / "releases", progress=False)
    store.close()
    return root


@pytest.fixture()
def release(made, tmp_path):
    """A fresh writable copy of release v1 (files stay read-only as export made them)."""
    dst = tmp_path / "releases" / "v1"
    shutil.copytree(made / "releases" / "v1", dst, symlinks=True)
    assert verify_release(dst) == []
    return dst


def _writable(path: Path) -> None:
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


def _rewrite_manifest(release: Path, edit) -> None:
    mpath = release / "manifest.json"
    manifest = json.loads(mpath.read_text("utf-8"))
    edit(manifest)
    text = json.dumps(manifest, indent=2) + "\n"
    for p in (mpath, release / "MANIFEST.sha256"):
        _writable(p)
    mpath.write_text(text, encoding="utf-8")  # keep MANIFEST.sha256 consistent: only the entry is wrong
    (release / "MANIFEST.sha256").write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  manifest.json\n")


def _verify_fails(release: Path, *needles: str) -> str:
    r = CliRunner().invoke(cli, ["verify", str(release)])
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    fails = [x for x in r.stderr.splitlines() if x.startswith("FAIL ")]
    assert any(all(n in x for n in needles) for x in fails), r.stderr
    return r.stderr


def test_symlink_to_an_outside_file_with_the_same_bytes(release, tmp_path):
    outside = tmp_path / "taxonomy_copy.json"
    outside.write_bytes((release / "taxonomy.json").read_bytes())
    (release / "taxonomy.json").unlink()
    (release / "taxonomy.json").symlink_to(outside)
    _verify_fails(release, "taxonomy.json", "symbolic link", str(outside))


def test_symlink_to_an_outside_directory(release):
    (release / "etc_link").symlink_to("/etc")
    _verify_fails(release, "etc_link", "symbolic link", "/etc")


def test_symlinked_folder_inside_the_release(release):
    arrays = release / "arrays.zarr"
    moved = release.parent / "arrays_elsewhere.zarr"
    arrays.rename(moved)
    arrays.symlink_to(moved)
    _verify_fails(release, "arrays.zarr", "symbolic link")


def test_hard_link_to_a_file_outside(release, tmp_path):
    os.link(release / "nuclei.parquet", tmp_path / "shared_nuclei.parquet")
    _verify_fails(release, "nuclei.parquet", "hard-linked to 1 file(s) outside the release")


def test_special_file_in_the_release(release):
    os.mkfifo(release / "pipe")
    _verify_fails(release, "pipe", "not a regular file")


@pytest.mark.parametrize(("entry", "value", "needle"), [
    ("../outside.txt", None, "leaves the folder"),
    ("/etc/hostname", None, "is an absolute path"),
    ("nuclei.parquet", "not-an-object", "is malformed"),
    ("nuclei.parquet", {"sha256": 12345, "bytes": 1}, "is malformed"),
    ("nuclei.parquet", {"sha256": "zz" * 32, "bytes": 1}, "is malformed"),
    ("nuclei.parquet", {"sha256": "0" * 64, "bytes": "big"}, "is malformed"),
])
def test_malformed_manifest_files_entry(release, entry, value, needle):
    def edit(m):
        m["files"][entry] = value if value is not None else {"sha256": "0" * 64, "bytes": 1}

    _rewrite_manifest(release, edit)
    _verify_fails(release, "manifest.json", repr(entry), needle)


def test_manifest_entry_that_resolves_outside_through_a_link(release, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f.txt").write_text("hi")
    (release / "lnk").symlink_to(tmp_path / "x")
    _rewrite_manifest(release, lambda m: m["files"].update({"lnk/f.txt": {"sha256": "0" * 64, "bytes": 2}}))
    _verify_fails(release, "manifest.json", "'lnk/f.txt'", "resolves outside the release")


def test_export_refuses_to_write_a_link(made, tmp_path, monkeypatch):
    import cellcurate.curation.card as card

    orig = card.write_card

    def card_with_link(tmp, *a, **k):
        orig(tmp, *a, **k)
        (Path(tmp) / "leak").symlink_to("/etc/hostname")

    monkeypatch.setattr(card, "write_card", card_with_link)
    with Store.open(made / "store") as store, pytest.raises(StateError, match="leak: is a symbolic link"):
        export_release(store, "v2", out=tmp_path / "releases", progress=False)
    assert list((tmp_path / "releases").iterdir()) == []  # no release, no temp folder


KILLED_EXPORT = """
import os, signal, sys
import cellcurate.curation.release as rel
from cellcurate.datasets.store import Store
rel._fsync_and_freeze = lambda root: os.kill(os.getpid(), signal.SIGKILL)  # the moment before the rename
rel.export_release(Store.open(sys.argv[1]), "v2", out=sys.argv[2], progress=False)
"""


def test_temp_folder_of_a_killed_export_is_removed_by_the_next_export(made, tmp_path):
    store_copy = tmp_path / "store"
    shutil.copytree(made / "store", store_copy)
    out = tmp_path / "releases"
    r = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(store_copy), str(out)], check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".tmp-v2-")  # what a SIGKILL leaves
    r = CliRunner().invoke(cli, ["export", str(store_copy), "--version", "v2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"note: {out / left[0]}: removed the temporary folder of an interrupted export" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["v2"]
    assert verify_release(out / "v2") == []


def test_verify_release_removes_and_reports_leftover_temp_folders(release):
    stale = release.parent / ".tmp-v7-0badf00d"
    (stale / "arrays.zarr").mkdir(parents=True)
    (stale / "arrays.zarr" / "zarr.json").write_text("{}")
    os.chmod(stale / "arrays.zarr" / "zarr.json", stat.S_IRUSR)  # frozen like a release's files
    r = CliRunner().invoke(cli, ["verify", str(release)])
    assert r.exit_code == 0, r.output
    assert f"note: {stale}: removed the temporary folder of an interrupted export" in r.stderr
    assert not stale.exists()


def test_verify_store_removes_leftover_export_temp_folders(made, tmp_path):
    store_copy = tmp_path / "store"
    shutil.copytree(made / "store", store_copy)
    stale = store_copy / "releases" / ".tmp-v1-deadbeef"
    stale.mkdir(parents=True)
    (stale / "images.parquet").write_bytes(b"half")
    r = CliRunner().invoke(cli, ["verify", str(store_copy)])
    assert r.exit_code == 0, r.output
    assert "removed the temporary folder of an interrupted export" in r.stderr and not stale.exists()


def test_a_live_export_temp_folder_is_left_alone(release):
    from cellcurate.datasets.leftovers import locked_tempdir, release_tempdir

    live, fd = locked_tempdir(release.parent, ".tmp-v3-")
    try:
        r = CliRunner().invoke(cli, ["verify", str(release)])
        assert r.exit_code == 0 and "interrupted export" not in r.stderr
        assert live.is_dir()
    finally:
        release_tempdir(fd)


def test_verify_store_refuses_links_and_unit_paths_outside(made, tmp_path):
    import sqlite3

    store_copy = tmp_path / "store"
    shutil.copytree(made / "store", store_copy)
    (store_copy / "units" / "etc_link").symlink_to("/etc")
    con = sqlite3.connect(store_copy / "ledger.sqlite")
    con.execute("UPDATE units SET dir = '../../outside'")
    con.commit()
    con.close()
    r = CliRunner().invoke(cli, ["verify", str(store_copy)])
    assert r.exit_code == 1
    assert "units/etc_link: is a symbolic link (to /etc); a store must hold its files itself" in r.stderr
    assert "folder '../../outside' of unit" in r.stderr and "leaves the folder" in r.stderr


def _edit_array_meta(release: Path, edit) -> Path:
    meta = release / "arrays.zarr" / "stack" / "128x128" / "image" / "zarr.json"
    _writable(meta)
    m = json.loads(meta.read_text("utf-8"))
    if edit is None:
        meta.write_text("{not json", encoding="utf-8")
    else:
        edit(m)
        meta.write_text(json.dumps(m), encoding="utf-8")
    return meta


def _set_inner_codec(name):
    def edit(m):
        m["codecs"][0]["configuration"]["codecs"][1] = {"name": name}
    return edit


@pytest.mark.parametrize(("edit", "needle"), [
    (_set_inner_codec("numcodecs.pickle"), "codec 'numcodecs.pickle' is refused: decoding it would run code"),
    (_set_inner_codec("no_such_codec"), "unknown or unsupported codec 'no_such_codec'"),
    (lambda m: m["codecs"][0]["configuration"]["index_codecs"].append({"name": "mystery"}),
     "unknown or unsupported codec 'mystery'"),
    (lambda m: m.update(codecs=[{"name": "pickle"}]), "codec 'pickle' is refused"),
    (lambda m: m.update(data_type="object"), "data_type 'object' is not a numeric type"),
    (lambda m: m.update(codecs="bytes"), "'codecs' must be a list"),
    (lambda m: m.update(node_type="group"), "not a zarr v3 array"),
])
def test_export_qupath_refuses_a_release_array_with_a_bad_codec(release, tmp_path, edit, needle):
    meta = _edit_array_meta(release, edit)
    r = CliRunner().invoke(cli, ["export-qupath", str(release), "--out", str(tmp_path / "q")])
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.stderr.strip() == f"error: {meta}: {r.stderr.strip().split(': ', 2)[2]}"  # one line, names the file
    assert needle in r.stderr


def test_export_qupath_on_an_unparsable_zarr_json(release, tmp_path):
    meta = _edit_array_meta(release, None)
    r = CliRunner().invoke(cli, ["export-qupath", str(release), "--out", str(tmp_path / "q")])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: {meta}: not valid JSON")


def test_release_zarr_group_that_leaves_the_release(release, tmp_path):
    import pandas as pd

    from cellcurate.datasets.release import ReleaseDataset
    from cellcurate.errors import InputFormatError

    ipath = release / "images.parquet"
    df = pd.read_parquet(ipath)
    df["zarr_group"] = "../../../etc"
    _writable(ipath)
    df.to_parquet(ipath, index=False)
    ds = ReleaseDataset(release, split="all")
    with pytest.raises(InputFormatError, match="zarr_group '../../../etc' leaves the folder"):
        ds.read(0)


def test_full_disk_during_export_leaves_no_temp_folder(made, tmp_path, monkeypatch):
    import errno

    import pandas as pd
    import pyarrow.parquet as pq

    def no_space(self, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def no_space_table(table, where, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", no_space)  # the disk fills while the tables are written
    monkeypatch.setattr(pq, "write_table", no_space_table)
    out = tmp_path / "releases"
    r = CliRunner().invoke(cli, ["export", str(made / "store"), "--version", "v5", "--out", str(out)])
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.stderr.startswith("error: ") and "no space left on device; nothing was committed" in r.stderr
    assert list(out.iterdir()) == []  # neither v5 nor a .tmp-v5-* folder
