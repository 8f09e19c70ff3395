"""Ledger faults: a lock held by another process, a damaged file, read-only media.

Each case must end in one line ``error: ...`` naming the ledger, a non-zero exit, and no hang.
The busy timeout is shortened with ``CELLCURATE_LEDGER_TIMEOUT`` so the tests do not wait a minute;
the subprocess timeouts are far above what the commands need (they only stop a hang).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellcurate.datasets.ledger import LOCKED_MESSAGE, Ledger, lock_holders
from cellcurate.datasets.store import Store
from cellcurate.errors import StoreError
from cellcurate.napari_plugin.sample import write_disc_store, write_flags

CLI = [sys.executable, "-m", "cellcurate.cli.main"]
HANG = 120  # seconds: only a hang gets near this


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=2, per_image=4, size=128, seed=3)
    write_flags(s, fraction=0.5, seed=4)
    s.close()
    return tmp_path / "s"


def _curate(*args: str, timeout: float = 1.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CELLCURATE_LEDGER_TIMEOUT": str(timeout)}
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, timeout=HANG, env=env,
                          cwd=cwd)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


HOLDER = textwrap.dedent("""
    import sqlite3, sys
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    if sys.argv[2] == "exclusive":
        con.execute("PRAGMA locking_mode=EXCLUSIVE")
        con.execute("BEGIN EXCLUSIVE")
    else:
        con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO meta VALUES ('held', 'yes')")
    print("locked", flush=True)
    sys.stdin.readline()
    con.execute("ROLLBACK")
""")


class _Holder:
    """Another process holding the ledger's write lock (or an EXCLUSIVE lock) until released."""

    def __init__(self, ledger: Path, mode: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ledger), mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=HANG)


def _pending_csv(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "q.csv"
    r = _curate("review", str(store), "--export-csv", str(out), "--reviewer", "ana")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    df.loc[0, ["decision", "label"]] = ["set_class", "2"]
    df.to_csv(out, index=False)
    return out


def test_import_csv_on_a_write_locked_ledger_names_the_lock_and_does_not_hang(store, tmp_path):
    csv = _pending_csv(store, tmp_path)
    holder = _Holder(store / "ledger.sqlite", "immediate")
    try:
        r = _curate("review", str(store), "--import-csv", str(csv), "--reviewer", "ana")
        line = _one_line_error(r)
        assert str(store / "ledger.sqlite") in line and LOCKED_MESSAGE in line
        assert f"pid {holder.proc.pid}" in line  # the holder is named
    finally:
        holder.release()
    with Store.open(store) as s:
        assert s.ledger.count("decision") == 0  # nothing applied
    r = _curate("review", str(store), "--import-csv", str(csv), "--reviewer", "ana")  # lock gone: works
    assert r.returncode == 0 and "recorded 1 decisions" in r.stdout, r.stderr


@pytest.mark.parametrize("command", ["info", "verify"])
def test_exclusive_locked_ledger_gives_the_lock_message(store, command):
    holder = _Holder(store / "ledger.sqlite", "exclusive")
    try:
        line = _one_line_error(_curate(command, str(store)))
        assert str(store / "ledger.sqlite") in line and LOCKED_MESSAGE in line
    finally:
        holder.release()


def test_lock_holders_names_the_writing_process(store):
    holder = _Holder(store / "ledger.sqlite", "immediate")
    try:
        if not Path("/proc/locks").exists():
            pytest.skip("no /proc/locks on this system")
        assert any(h.startswith(f"pid {holder.proc.pid}") for h in lock_holders(store / "ledger.sqlite"))
        led = Ledger(store / "ledger.sqlite", busy_timeout=0.2)
        with pytest.raises(StoreError, match="ledger is locked by another curate process; retry or stop it"):
            led.append([{"kind": "decision", "actor": "ana", "nucleus_id": 1, "action": "skip"}])
        led.close()
    finally:
        holder.release()


@pytest.mark.parametrize("command", ["info", "verify"])
def test_ledger_replaced_by_random_bytes(store, command):
    (store / "ledger.sqlite").write_bytes(np.random.default_rng(7).bytes(8192))
    line = _one_line_error(_curate(command, str(store)))
    assert str(store / "ledger.sqlite") in line and "not an SQLite database" in line


def test_ledger_truncated_to_a_valid_header_only(store):
    data = (store / "ledger.sqlite").read_bytes()
    (store / "ledger.sqlite").write_bytes(data[:100] + b"\x00" * 50)
    line = _one_line_error(_curate("verify", str(store)))
    assert str(store / "ledger.sqlite") in line


def _run_read_only(store: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run curate on ``store`` on a read-only file system: a read-only bind mount in a private mount
    namespace when we are root (permission bits do not bind root), else ``chmod -R a-w``."""
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: cannot make a read-only mount")
        mnt = tmp_path / "ro"
        mnt.mkdir()
        probe_cmd = f"mount --bind -o ro '{store}' '{mnt}' && ! touch '{mnt}/probe' 2>/dev/null"
        probe = subprocess.run(["unshare", "-m", "sh", "-c", probe_cmd], check=False, capture_output=True)
        if probe.returncode != 0:
            pytest.skip("cannot make a read-only bind mount here")
        script = " ".join(f"'{a}'" for a in (*CLI, *[a.replace(str(store), str(mnt)) for a in args]))
        env = {**os.environ, "CELLCURATE_LEDGER_TIMEOUT": "1"}
        return subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{store}' '{mnt}' && exec {script}"],
                              check=False, capture_output=True, text=True, timeout=HANG, env=env)
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    try:
        return _curate(*args)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)


@pytest.mark.parametrize("command", ["info", "verify"])
def test_read_only_store_opens_without_writing(store, tmp_path, command):
    r = _run_read_only(store, tmp_path, command, str(store))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert ("OK" in r.stdout) if command == "verify" else ("Images" in r.stdout)
    assert not (store / "ledger.sqlite-wal").exists() and not (store / "ledger.sqlite-shm").exists()


def test_missing_ledger_opened_read_only():
    with pytest.raises(StoreError, match="no ledger.sqlite"):
        Ledger(Path("/nonexistent/ledger.sqlite"), readonly=True)


def test_ledger_read_error_inside_pandas_becomes_store_error(store):
    led = Ledger(store / "ledger.sqlite", readonly=True)
    led._con.close()  # a closed connection: pandas wraps the sqlite error in its own DatabaseError
    with pytest.raises(StoreError, match="ledger.sqlite"):
        led.units()
    with pytest.raises(StoreError):
        led.count()
