"""Store creation killed at the wrong moment, and leftovers of interrupted creations.

The kill moments are deterministic: the child process SIGKILLs itself from inside the step
(no timing, no sleeps), so the tests do not depend on the machine's speed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from cellcurate.datasets.checks import verify_store
from cellcurate.datasets.store import Store
from cellcurate.errors import StoreError

KILL_AT = {
    # moment -> code run in the child before Store.create, arranging a SIGKILL at that step
    "taxonomy_written": "store_mod.Ledger.__init__ = die",
    "ledger_half_made": "store_mod.Ledger.set_meta = die",
    "before_marker": "orig = store_mod.atomic_write_text\n"
                     "store_mod.atomic_write_text = lambda p, t: die() if p.name == 'store.json' else orig(p, t)",
    "before_rename": "os.rename = die",
    "after_rename": "store_mod.fsync_dir = die",
}

CHILD = """
import os, signal, sys
import cellcurate.datasets.store as store_mod
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
{arrange}
store_mod.Store.create(sys.argv[1])
print("not killed")
"""


def _kill_during_create(path, moment):
    code = CHILD.format(arrange=textwrap.indent(KILL_AT[moment], ""))
    r = subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr


@pytest.mark.parametrize("moment", list(KILL_AT))
def test_creation_killed_leaves_nothing_half_made_and_the_rerun_works(tmp_path, moment):
    path = tmp_path / "store"
    _kill_during_create(path, moment)
    # old state (nothing) or new state (a whole store), never a half-made folder at the store's name
    assert not path.exists() or (path / "store.json").is_file()
    store = Store.create(path, exist_ok=path.exists())
    assert (path / "store.json").is_file() and verify_store(store, progress=False).ok
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "store"]
    assert leftovers == []  # the killed creation's temp folder was removed by the rerun ...
    if moment != "after_rename":
        assert any("interrupted store creation" in n for n in store.notes)  # ... and said so
    store.close()


def test_interrupted_in_place_creation_is_recognised_and_redone(tmp_path):
    """What an older cellcurate (building in place, store.json last) left when killed."""
    path = tmp_path / "store"
    (path / "units").mkdir(parents=True)
    (path / "taxonomy.json").write_text("{", encoding="utf-8")  # cut off mid-write
    con = sqlite3.connect(path / "ledger.sqlite")
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.commit()
    con.close()
    (path / ".store.json.0a1b2c3d.tmp").write_text("", encoding="utf-8")
    with Store.create(path) as store:
        assert store.notes == [f"{path}: found an interrupted store creation (no store.json); removed it "
                               "and created the store afresh"]
        assert store.ledger.get_meta("taxonomy_hash") == store.taxonomy.hash


def test_cli_ingest_after_an_interrupted_creation_says_so(tmp_path, tiny_sample):
    path = tmp_path / "store"
    _kill_during_create(path, "before_rename")
    path.mkdir()
    (path / "units").mkdir()
    (path / "taxonomy.json").write_text("{}", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "cellcurate.cli.main", "ingest", "pannuke",
                        str(tiny_sample.pannuke_root), "--store", str(path)],
                       check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "note: " in r.stderr and "interrupted store creation" in r.stderr
    with Store.open(path) as store:
        assert len(store.images()) > 0 and verify_store(store, progress=False).ok


@pytest.mark.parametrize("content", ["foreign_file", "unit_folder", "ledger_with_events"])
def test_a_folder_that_is_not_an_interrupted_creation_is_refused(tmp_path, content):
    path = tmp_path / "store"
    (path / "units").mkdir(parents=True)
    if content == "foreign_file":
        (path / "thesis.docx").write_bytes(b"precious")
    elif content == "unit_folder":
        (path / "units" / "pannuke-fold1-0a1b2c3d").mkdir()
    else:
        con = sqlite3.connect(path / "ledger.sqlite")
        con.execute("CREATE TABLE events (seq INTEGER)")
        con.execute("CREATE TABLE units (unit TEXT)")
        con.execute("INSERT INTO events VALUES (1)")
        con.commit()
        con.close()
    before = sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))
    with pytest.raises(StoreError, match="folder exists and is not an empty cellcurate store"):
        Store.create(path)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) == before  # nothing touched


def test_create_in_an_existing_empty_folder(tmp_path):
    path = tmp_path / "store"
    path.mkdir()
    with Store.create(path) as store:
        assert store.notes == [] and (path / "store.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_live_creation_is_not_removed(tmp_path):
    """A creation temp folder whose writer is alive (holds the lock) is left alone."""
    from cellcurate.datasets.leftovers import locked_tempdir, release_tempdir, stale_tempdirs

    tmp, fd = locked_tempdir(tmp_path, ".store.creating-")
    try:
        assert stale_tempdirs(tmp_path, ".store.creating-") == []
        with Store.create(tmp_path / "store"):
            pass
        assert tmp.is_dir()
    finally:
        release_tempdir(fd)
    assert stale_tempdirs(tmp_path, ".store.creating-") == [tmp]
    os.rmdir(tmp)
